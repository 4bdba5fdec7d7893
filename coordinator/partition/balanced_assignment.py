"""The balanced assignment step of k-means: exact cluster sizes, maximal total similarity.

Given the ``N x K`` cosine similarities of points to centroids, assign every point so that
cluster ``k`` receives exactly ``capacities[k]`` points (by default :func:`balanced_sizes`:
``N // K`` or ``N // K + 1``) and the total similarity is as large as possible: a
transportation problem, solved by :func:`balanced_assignment` as follows.

* The problem's dual has only K variables, one *price* per cluster: at the optimum every point
  sits in a cluster maximising ``similarity - price``. Lloyd iterations move the centroids a
  little at a time, so the previous iteration's prices are nearly right for the next one (a
  cold start first settles them on a random 1/8 of the points, recursively).
* Newton steps on the prices: with many points, cluster loads are nearly smooth functions of
  the prices, and the densities of points on each cluster boundary give the Jacobian. A few
  passes bring the total excess from thousands of points to a few hundred.
* The exact finish is successive shortest paths on the K-node cluster graph (the Hungarian
  method's dual update): each path moves one point per edge from an over-full cluster to one
  with room, and every point stays in a best priced cluster, so the result is optimal for its
  capacities (the tests compare against ``scipy.optimize.linear_sum_assignment``). Its inner
  loops are compiled (:mod:`coordinator.partition.kmeans_kernels`) and keep the few cheapest
  moves between every pair of clusters up to date incrementally.
* Two clusters need no prices search: the points that gain most from cluster 0 take it.

Rows of unequal mass (the two-stage coarse step) are assigned by
:mod:`coordinator.partition.auction` instead.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from coordinator.partition import kmeans_kernels as kernels

__all__ = ["balanced_assignment", "balanced_sizes", "priced_argmax"]

# When more than this fraction of points sit in over-full clusters, prices are first settled on
# a random 1/_MULTISCALE_FACTOR of the points (if that leaves at least _MULTISCALE_BASE).
_MULTISCALE_EXCESS = 0.01
_MULTISCALE_FACTOR = 8
_MULTISCALE_BASE = 4096
# Newton steps on the prices pay off once loads are smooth functions of the prices.
_NEWTON_MIN_POINTS = 4096
# A Newton step moves no price by more than this many bandwidths (the density model is local).
_NEWTON_REACH = 32
_NEWTON_HALVINGS = 2
# A Newton step that settles fewer than K points per pass over the N x K similarities is the
# last one: a shortest path per point is then cheaper (measured: one pass costs about as much
# as 100 paths at K = 128, both at N = 32k and at N = 1M).
_NEWTON_MIN_GAIN = 1.0


def balanced_sizes(num_points: int, num_clusters: int) -> np.ndarray:
    """Cluster capacities that differ by at most one: the first ``N mod K`` get one extra.

    Args:
        num_points: N, the number of points (or total mass) to split.
        num_clusters: K.

    Returns:
        ``K`` int64 capacities summing to ``num_points``.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be at least 1, got {num_clusters}")
    sizes = np.full(num_clusters, num_points // num_clusters, dtype=np.int64)
    sizes[: num_points % num_clusters] += 1
    return sizes


def priced_argmax(
    similarity: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best priced cluster of every row, its margin over the second best, and the second best
    cluster (one compiled pass, no temporaries)."""
    n = similarity.shape[0]
    labels = np.empty(n, dtype=np.int64)
    runner_up = np.empty(n, dtype=np.int64)
    margins = np.empty(n, dtype=np.float64)
    kernels.priced_top2(
        np.ascontiguousarray(similarity, dtype=np.float32),
        np.asarray(prices, dtype=np.float64),
        labels,
        margins,
        runner_up,
    )
    return labels, margins, runner_up


def _newton_prices(
    similarity: np.ndarray,
    capacities: np.ndarray,
    prices: np.ndarray,
    target: float,
    priced: tuple[np.ndarray, np.ndarray, np.ndarray],
    max_steps: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Moves prices toward exact balance with Newton steps on the K-dimensional dual.

    With many points, cluster loads are nearly smooth functions of the prices: raising
    ``p_k - p_l`` by ``d`` moves about ``d * density`` points from k to l, where the density of
    points on the k|l boundary is estimated from those with a margin below ``h``. Those
    densities form a graph Laplacian ``L`` and ``L @ step = excess`` is the Newton step. A few
    steps bring the total excess from thousands to a few hundred, which shortest paths then
    settle exactly; a step that does not reduce the excess is halved.

    Args:
        priced: :func:`priced_argmax` of ``similarity`` under ``prices`` (the caller's pass).

    Returns:
        ``(prices, labels)`` with every row in its best cluster under the returned prices.
    """
    n, k = similarity.shape
    labels, margins, runner_up = priced
    excess = np.bincount(labels, minlength=k) - capacities
    total = np.maximum(excess, 0).sum()
    for _step in range(max_steps):
        if total <= target:
            break
        # The bandwidth h: wide enough for a stable density estimate (5 % of the points, and
        # several times the points that must move), narrow enough to describe the boundaries
        # near the current prices.
        count = min(n - 1, max(4 * int(total), n // 20, 16 * k))
        h = float(np.partition(margins, count)[count])
        if not h > 0:
            break
        boundary = margins < h
        pairs = np.bincount(labels[boundary] * k + runner_up[boundary], minlength=k * k)
        density = pairs.reshape(k, k).astype(np.float64)
        density = (density + density.T) / (2 * h)
        laplacian = np.diag(density.sum(axis=1)) - density
        # The Laplacian is singular (adding a constant to all prices changes nothing) and a
        # cluster with no boundary points has an empty row; the small ridge keeps the solve
        # finite and leaves such a cluster's price nearly where it was.
        ridge = 1e-3 * max(float(np.trace(laplacian)) / k, 1.0)
        # torch's solver: numpy's OpenBLAS threads fight torch's for the two cores (100x slower).
        step = torch.linalg.solve(
            torch.from_numpy(laplacian + ridge * np.eye(k)), torch.from_numpy(excess * 1.0)
        ).numpy()
        # The density model only holds within about h of the current prices: a cluster with
        # few boundary points would otherwise get a step that empties its neighbours.
        step = np.clip(step - np.median(step), -_NEWTON_REACH * h, _NEWTON_REACH * h)
        for halving in range(_NEWTON_HALVINGS):
            trial = prices + step
            t_labels, t_margins, t_runner = priced_argmax(similarity, trial)
            t_excess = np.bincount(t_labels, minlength=k) - capacities
            t_total = np.maximum(t_excess, 0).sum()
            if t_total < total:
                slow = total - t_total < _NEWTON_MIN_GAIN * k * (halving + 1)
                prices = trial
                labels, margins, runner_up = t_labels, t_margins, t_runner
                excess, total = t_excess, t_total
                break
            step = step / 2
        else:
            break
        if slow:  # the density model has stopped paying: shortest paths are cheaper now
            break
    return prices, labels


def _newton_target(n: int, k: int) -> float:
    """Total excess below which the exact finish is cheaper than another Newton pass."""
    return max(4.0, k / 8)


def balanced_assignment(
    similarity: np.ndarray,
    capacities: np.ndarray | None = None,
    *,
    prices: np.ndarray | None = None,
    seed: int = 0,
    exact: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Assigns every row to a cluster, with exact cluster sizes, maximising total similarity.

    Args:
        similarity: ``N x K`` float32 (row = point, column = cluster); it is only read.
        capacities: ``K`` integers summing to N; default :func:`balanced_sizes`.
        prices: starting cluster prices (for example the previous Lloyd iteration's); any
            values are correct, good ones are fast. Default: zeros.
        seed: seeds the subsample used to settle prices that are far from right.
        exact: False stops after the Newton steps (when N is large enough for them): every
            row is then in its best priced cluster, the optimum for sizes within a few points
            of ``capacities`` -- what an intermediate Lloyd iteration needs.

    Returns:
        ``(labels, prices)``: ``N`` int64 cluster ids meeting the capacities exactly (unless
        ``exact`` is False), and the ``K`` float64 prices that certify them.
    """
    n, k = similarity.shape
    capacities = balanced_sizes(n, k) if capacities is None else np.asarray(capacities, np.int64)
    if capacities.shape != (k,) or capacities.sum() != n or (capacities < 0).any():
        raise ValueError(
            f"capacities must be {k} non-negative integers summing to {n}, got {capacities}"
        )
    similarity = np.ascontiguousarray(similarity, dtype=np.float32)
    if k == 2:
        return _two_way(similarity, int(capacities[0]))
    prices = np.zeros(k) if prices is None else np.asarray(prices, dtype=np.float64)
    priced = priced_argmax(similarity, prices)
    labels = priced[0]
    counts = np.bincount(labels, minlength=k)
    excess = int(np.maximum(counts - capacities, 0).sum())
    if excess == 0:
        return labels, prices
    if excess > _MULTISCALE_EXCESS * n and n >= _MULTISCALE_FACTOR * max(_MULTISCALE_BASE, 32 * k):
        # Prices far from right (a cold start, or centroids that moved a lot): settle them on a
        # random 1/8 of the points first (recursively), where the same work is 8x cheaper;
        # prices are K numbers and transfer, leaving only sampling noise to fix here.
        rng = np.random.default_rng(np.random.SeedSequence([seed, n]))
        sample = np.sort(rng.choice(n, n // _MULTISCALE_FACTOR, replace=False))
        _, prices = balanced_assignment(
            similarity[sample],
            _proportional(capacities, sample.size),
            prices=prices,
            seed=seed + 1,
        )
        priced = priced_argmax(similarity, prices)
        labels = priced[0]
        excess = int(np.maximum(np.bincount(labels, minlength=k) - capacities, 0).sum())
        if excess == 0:
            return labels, prices
    if n > _NEWTON_MIN_POINTS:
        prices, labels = _newton_prices(
            similarity, capacities, prices, target=_newton_target(n, k), priced=priced
        )
        if not exact:
            return labels, prices
    return kernels.unit_shortest_paths(
        similarity, capacities, prices, labels, numba.get_num_threads()
    )


def _two_way(similarity: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Two clusters: the ``first`` rows that gain most from cluster 0 over cluster 1 take it,
    which is optimal by exchange (one selection, no prices to search). The price of cluster 0
    sits between the last row taken and the first row left, so the prices certify it."""
    n = similarity.shape[0]
    gain = similarity[:, 0].astype(np.float64) - similarity[:, 1]
    labels = np.ones(n, dtype=np.int64)
    if first == 0:
        return labels, np.array([gain.max() + 1.0, 0.0])
    if first == n:
        return np.zeros(n, dtype=np.int64), np.array([gain.min() - 1.0, 0.0])
    order = np.argpartition(-gain, first - 1)
    labels[order[:first]] = 0
    taken, left = gain[order[:first]].min(), gain[order[first:]].max()
    return labels, np.array([(taken + left) / 2, 0.0])


def _proportional(capacities: np.ndarray, size: int) -> np.ndarray:
    """Capacities for a subsample of ``size`` rows, in proportion (largest remainders)."""
    exact = capacities * (size / capacities.sum())
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(out - exact, kind="stable")[: size - int(out.sum())]] += 1
    return out
