"""Exactly balanced spherical k-means, at million-sample scale on a CPU.

The paper splits the unique images into K clusters *of equal size* (DESIGN §1). Lloyd's
algorithm stays the same -- assign every point, then move every centroid to the normalised mean
of its points -- but the assignment step becomes a transportation problem: maximise the total
cosine similarity subject to cluster ``k`` receiving exactly ``capacities[k]`` points, where the
capacities are ``N // K`` or ``N // K + 1`` (so sizes differ by at most one for any N and K).

How the assignment step is solved (:func:`balanced_assignment`):

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
* Centroid sums are updated from the points that changed cluster, not recomputed.
* Lloyd iterations before the last stop after the Newton steps: every point is then in its
  best priced cluster, the exact optimum for cluster sizes within a few points of balanced.
  The last iteration (or the one where the assignment stops changing) is finished exactly.
* Similarities are computed block by block with one matrix multiply per block; the largest
  intermediate is the ``N x K`` similarity matrix, never an ``N x K x D`` tensor.
* The two-stage coarse step, where a fine cluster of ``w`` points is one row of mass ``w``,
  uses an auction on rising prices (a heavy row may be split), finished by the same paths.

Example::

    >>> import numpy as np
    >>> from coordinator.partition.kmeans import balanced_spherical_kmeans
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1003, 16)).astype(np.float32)
    >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
    >>> result = balanced_spherical_kmeans(x, 10, seed=0)
    >>> sorted(set(np.bincount(result.labels).tolist()))
    [100, 101]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import torch

from coordinator.partition import kmeans_kernels as kernels

__all__ = [
    "KMeansResult",
    "TwoStageResult",
    "balanced_assignment",
    "balanced_sizes",
    "balanced_spherical_kmeans",
    "nearest_assignment",
    "spherical_kmeans",
    "two_stage_balanced_kmeans",
]

# Points whose similarity rows are computed in one matrix multiply: 32k x 512 float32 is 64 MiB
# of features and (at K = 128) 16 MiB of similarities, small next to the feature matrix.
DEFAULT_BLOCK = 32_768
# When more than this fraction of points sit in over-full clusters, prices are first settled on
# a random 1/_MULTISCALE_FACTOR of the points (if that leaves at least _MULTISCALE_BASE).
_MULTISCALE_EXCESS = 0.01
_MULTISCALE_FACTOR = 8
_MULTISCALE_BASE = 4096
# Prices within this of optimal are good enough: cosines are in [-1, 1], so the total is within
# N * 1e-6 of the optimum, far inside the 99.9 % quality bar and above float32 noise in sums.
DEFAULT_EPSILON = 1e-6
# Auction rounds without less total excess before the exact shortest-path finish takes over,
# and the total excess below which it takes over anyway (each path settles one unit).
_AUCTION_PATIENCE = 4
_SHORTEST_PATH_EXCESS = 8
# Newton steps on the prices pay off once loads are smooth functions of the prices.
_NEWTON_MIN_POINTS = 4096
# A Newton step moves no price by more than this many bandwidths (the density model is local).
_NEWTON_REACH = 32
_NEWTON_HALVINGS = 2
# A Newton step that settles fewer than K points per pass over the N x K similarities is the
# last one: a shortest path per point is then cheaper (measured: one pass costs about as much
# as 100 paths at K = 128, both at N = 32k and at N = 1M).
_NEWTON_MIN_GAIN = 1.0

# Cluster sums are updated from the rows that changed cluster unless more than 1/this of them
# did (a fresh parallel sum reads each row once; an update reads a mover twice, on one thread).
_FRESH_SUMS = 8

Progress = Callable[[int, float], None]
"""Called after each Lloyd iteration with (iteration, objective)."""


@dataclass(frozen=True)
class KMeansResult:
    """The outcome of a (balanced) spherical k-means fit.

    Attributes:
        centroids: ``K x D`` float32, unit rows.
        labels: ``N`` int64 cluster ids.
        objective: total cosine similarity of every point to its own centroid.
        iterations: Lloyd iterations run.
        converged: True if the assignment stopped changing before the iteration cap.
        prices: the ``K`` dual prices of the last balanced assignment (zeros when unbalanced).
    """

    centroids: np.ndarray
    labels: np.ndarray
    objective: float
    iterations: int
    converged: bool
    prices: np.ndarray


@dataclass(frozen=True)
class TwoStageResult:
    """A :class:`KMeansResult` for the coarse clusters plus the fine stage it was built from.

    Attributes:
        result: coarse centroids and per-point coarse labels.
        fine_centroids: ``F x D`` unit rows of the unbalanced fine clustering.
        fine_labels: ``N`` fine cluster ids.
    """

    result: KMeansResult
    fine_centroids: np.ndarray
    fine_labels: np.ndarray


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


# ----------------------------------------------------------------------------------------------
# The balanced assignment step
# ----------------------------------------------------------------------------------------------


def _priced_argmax(
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
        priced: :func:`_priced_argmax` of ``similarity`` under ``prices`` (the caller's pass).

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
            t_labels, t_margins, t_runner = _priced_argmax(similarity, trial)
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


def _auction(
    similarity: np.ndarray,
    capacities: np.ndarray,
    prices: np.ndarray,
    mass: np.ndarray | None = None,
    epsilon: float = DEFAULT_EPSILON,
    max_rounds: int = 100_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Capacity-exact assignment of rows to clusters by rising cluster prices.

    The state is a list of *pieces* ``(row, cluster, mass)``; with unit masses each row is one
    piece and no piece ever splits. With masses (the two-stage coarse step: a fine cluster of
    ``w`` samples is a row of mass ``w``) a row can be split across clusters.

    Each round, every over-full cluster raises its price just past the margin of its
    ``excess``-th lowest-margin member, and those members move to their best cluster under the
    new prices. Margins are kept as lower bounds that stay valid as prices rise (a member's
    margin only falls when its own price rises, by exactly that much), so a round computes
    exact margins only for the few members that could be shed, not for every member.

    Returns:
        ``(rows, clusters, masses, prices)`` of the final pieces; ``prices`` is a new array.
    """
    n, k = similarity.shape
    prices = prices.astype(np.float64, copy=True)
    capacities = capacities.astype(np.float64)
    unit = mass is None
    piece_row = np.arange(n, dtype=np.int64)
    piece_mass = np.ones(n, dtype=np.float64) if mass is None else mass.astype(np.float64)
    piece_cluster, margins, _ = _priced_argmax(similarity, prices)
    # anchor - price[own cluster] is a lower bound on a piece's margin while prices only rise.
    anchor = margins + prices[piece_cluster]
    best_excess, stalled = np.inf, 0
    for _round in range(max_rounds):
        load = np.bincount(piece_cluster, weights=piece_mass, minlength=k)
        excess = load - capacities
        over = excess > 0.5  # loads and capacities are integers held in float64
        if not over.any():
            return piece_row, piece_cluster, piece_mass, prices
        total_excess = float(excess[over].sum())
        stalled = stalled + 1 if total_excess >= best_excess else 0
        best_excess = min(best_excess, total_excess)
        if stalled >= _AUCTION_PATIENCE or total_excess <= _SHORTEST_PATH_EXCESS:
            # A price war (a few units bouncing between full clusters while prices creep up by
            # epsilon) or a short tail: shortest paths raise whole groups of clusters at once.
            return _shortest_paths(
                similarity, capacities, prices, piece_row, piece_cluster, piece_mass, epsilon
            )
        sel, margin = _lowest_margins(
            similarity, prices, piece_row, piece_cluster, piece_mass, anchor, excess, over
        )
        own_cluster = piece_cluster[sel]
        sel_mass = piece_mass[sel]
        cumulative = np.cumsum(sel_mass)
        starts = np.flatnonzero(np.r_[True, own_cluster[1:] != own_cluster[:-1]])
        group_offset = np.repeat(
            cumulative[starts] - sel_mass[starts], np.diff(np.r_[starts, sel.size])
        )
        before = cumulative - sel_mass - group_offset
        shed_amount = np.clip(excess[own_cluster] - before, 0.0, sel_mass)
        shed = shed_amount > 0.5
        # The price rises by the largest shed margin (+ epsilon), so every shed piece now
        # strictly prefers some other cluster and every kept member is within epsilon of its best.
        threshold = np.full(k, -np.inf)
        np.maximum.at(threshold, own_cluster[shed], margin[shed])
        raised = np.isfinite(threshold)
        prices[raised] += threshold[raised] + epsilon
        partial = shed & (shed_amount < sel_mass - 0.5)
        if partial.any():
            # The shed part of a split piece becomes a new piece; the rest stays put.
            split = sel[partial]
            piece_mass[split] -= shed_amount[partial]
            piece_row = np.concatenate([piece_row, piece_row[split]])
            piece_cluster = np.concatenate([piece_cluster, piece_cluster[split]])
            piece_mass = np.concatenate([piece_mass, shed_amount[partial]])
            anchor = np.concatenate([anchor, anchor[split]])
            new_pieces = np.arange(piece_row.size - split.size, piece_row.size)
            moving = np.concatenate([sel[shed & ~partial], new_pieces])
        else:
            moving = sel[shed]
        values = similarity[piece_row[moving]].astype(np.float64) - prices
        target = values.argmax(axis=1)
        piece_cluster[moving] = target
        anchor[moving] = _exact_margins(values, target) + prices[target]
        if not unit:
            piece_row, piece_cluster, piece_mass, anchor = _merge_pieces(
                piece_row, piece_cluster, piece_mass, anchor, k
            )
    raise RuntimeError(f"balanced assignment did not finish within {max_rounds} auction rounds")


def _exact_margins(values: np.ndarray, own: np.ndarray) -> np.ndarray:
    """``values[i, own[i]]`` minus the best other value of row i (``values`` is overwritten)."""
    rows = np.arange(values.shape[0])
    mine = values[rows, own].copy()
    if values.shape[1] == 1:
        return np.full(values.shape[0], np.inf)
    values[rows, own] = -np.inf
    return mine - values.max(axis=1)


def _group_order(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Indices sorting by group, then by key: one float argsort (np.lexsort is ~10x slower).

    Keys are margins, within a few units of zero; squashing them into (0, 1) keeps their order
    and float64 keeps them distinct at the precision that matters (epsilon = 1e-6).
    """
    squashed = 0.5 + np.arctan(key) / np.pi  # monotone, in (0, 1); +-inf map to 1 and 0
    return np.argsort(group * 2.0 + squashed, kind="stable")


def _lowest_margins(
    similarity: np.ndarray,
    prices: np.ndarray,
    piece_row: np.ndarray,
    piece_cluster: np.ndarray,
    piece_mass: np.ndarray,
    anchor: np.ndarray,
    excess: np.ndarray,
    over: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The lowest-margin members of every over-full cluster, grouped by cluster and sorted by
    exact margin within each group, enough of them to cover each cluster's excess.

    Exact margins are computed for the members with the lowest lower bounds only; the set is
    widened until no member left out could have a lower margin than the ones kept.
    """
    members = np.flatnonzero(over[piece_cluster])
    own = piece_cluster[members]
    bound = anchor[members] - prices[own]
    order = _group_order(own, bound)
    members, own, bound = members[order], own[order], bound[order]
    starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, members.size]))
    # Members of a cluster at least as numerous as its excess, in units of mass.
    cumulative = np.cumsum(piece_mass[members])
    before = cumulative - piece_mass[members] - (cumulative - piece_mass[members])[starts][group]
    widen = 2
    while True:
        need = excess[own] * widen + 8
        chosen = before < need
        values = similarity[piece_row[members[chosen]]].astype(np.float64) - prices
        exact = _exact_margins(values, own[chosen])
        anchor[members[chosen]] = exact + prices[own[chosen]]
        # The excess-th smallest exact margin per cluster must not exceed the lowest bound of
        # the members left out; otherwise widen.
        sub_members, sub_own = members[chosen], own[chosen]
        sub_order = _group_order(sub_own, exact)
        sub_members, sub_own, exact = sub_members[sub_order], sub_own[sub_order], exact[sub_order]
        sub_mass = piece_mass[sub_members]
        sub_starts = np.flatnonzero(np.r_[True, sub_own[1:] != sub_own[:-1]])
        sub_group = np.repeat(np.arange(sub_starts.size), np.diff(np.r_[sub_starts, sub_own.size]))
        sub_cum = np.cumsum(sub_mass)
        sub_before = sub_cum - sub_mass - (sub_cum - sub_mass)[sub_starts][sub_group]
        covering = sub_before < excess[sub_own]
        worst = np.full(excess.size, -np.inf)
        np.maximum.at(worst, sub_own[covering], exact[covering])
        left_out = ~chosen
        lowest_left = np.full(excess.size, np.inf)
        np.minimum.at(lowest_left, own[left_out], bound[left_out])
        if np.all(worst[over] <= lowest_left[over]) or chosen.all():
            return sub_members, exact
        widen *= 4


def _shortest_paths(
    similarity: np.ndarray,
    capacities: np.ndarray,
    prices: np.ndarray,
    piece_row: np.ndarray,
    piece_cluster: np.ndarray,
    piece_mass: np.ndarray,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Finishes an auction by successive shortest paths on the K-node cluster graph.

    Moving piece i from cluster a to b costs ``(s_ia - p_a) - (s_ib - p_b) >= -epsilon``; the
    cheapest such move per (a, b) is ``move[a, b] - p_a + p_b`` with ``move`` independent of
    the prices, so after each augmentation only the rows of clusters whose members changed are
    recomputed. Dijkstra runs from every over-full cluster at once; raising each cluster's
    price by how much closer it is than the nearest under-full cluster keeps every piece
    within epsilon of its best cluster (the Hungarian method's dual update).
    """

    k = similarity.shape[1]
    prices = prices.copy()
    piece_row, piece_cluster, piece_mass = piece_row.copy(), piece_cluster.copy(), piece_mass.copy()
    move = np.full((k, k), np.inf)
    best_piece = np.zeros((k, k), dtype=np.int64)

    def refresh(cluster: int) -> None:
        members = np.flatnonzero(piece_cluster == cluster)
        move[cluster], best_piece[cluster] = np.inf, 0
        if members.size:
            rows = similarity[piece_row[members]].astype(np.float64)
            cost = rows[:, cluster : cluster + 1] - rows
            pick = cost.argmin(axis=0)
            move[cluster] = cost[pick, np.arange(k)]
            best_piece[cluster] = members[pick]
            move[cluster, cluster] = np.inf

    for cluster in range(k):
        refresh(cluster)
    while True:
        load = np.bincount(piece_cluster, weights=piece_mass, minlength=k)
        excess = load - capacities
        if not (excess > 0.5).any():
            return piece_row, piece_cluster, piece_mass, prices
        # Reduced costs are >= -epsilon; clamping at zero keeps Dijkstra exact up to epsilon.
        sinks, found, parent = kernels.shortest_path_tree(
            move, prices, np.rint(excess).astype(np.int64), 1
        )
        if found == 0:
            raise RuntimeError("balanced assignment: no path to a cluster with room")
        path = [int(sinks[0])]
        while parent[path[-1]] >= 0:
            path.append(int(parent[path[-1]]))
        path.reverse()
        edges = list(itertools.pairwise(path))
        amount = min(excess[path[0]], -excess[path[-1]])
        amount = min([amount, *(piece_mass[best_piece[a, b]] for a, b in edges)])
        for a, b in edges:
            piece = best_piece[a, b]
            if amount < piece_mass[piece] - 0.5:
                piece_mass[piece] -= amount
                piece_row = np.append(piece_row, piece_row[piece])
                piece_cluster = np.append(piece_cluster, b)
                piece_mass = np.append(piece_mass, amount)
            else:
                piece_cluster[piece] = b
        for cluster in set(path):
            refresh(cluster)


def _newton_target(n: int, k: int) -> float:
    """Total excess below which the exact finish is cheaper than another Newton pass."""
    return max(4.0, k / 8)


def _merge_pieces(
    rows: np.ndarray, clusters: np.ndarray, masses: np.ndarray, anchor: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of the same row in the same cluster become one (keeps the weighted state small)."""
    keys, inverse = np.unique(rows * k + clusters, return_inverse=True)
    merged = np.bincount(inverse, weights=masses)
    # Pieces of one row in one cluster have the same margin; the smaller bound stays valid.
    bound = np.full(keys.size, np.inf)
    np.minimum.at(bound, inverse, anchor)
    keep = merged > 0.5
    return (keys // k)[keep], (keys % k)[keep], merged[keep], bound[keep]


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
    priced = _priced_argmax(similarity, prices)
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
        priced = _priced_argmax(similarity, prices)
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


# ----------------------------------------------------------------------------------------------
# Lloyd iterations
# ----------------------------------------------------------------------------------------------


def _as_unit_rows(features: np.ndarray, what: str = "features") -> np.ndarray:
    """Float32, C-contiguous, unit rows; copies only when it must."""
    if features.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (N x D), got shape {features.shape}")
    x = np.ascontiguousarray(features, dtype=np.float32)
    norms = np.empty(x.shape[0], dtype=np.float32)
    for start in range(0, x.shape[0], DEFAULT_BLOCK):
        block = x[start : start + DEFAULT_BLOCK]
        norms[start : start + DEFAULT_BLOCK] = np.sqrt(np.einsum("ij,ij->i", block, block))
    if not np.all(np.isfinite(norms)):
        raise ValueError(f"{what}: row {int(np.flatnonzero(~np.isfinite(norms))[0])} is not finite")
    if (norms == 0).any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(norms == 0)[0])} is all zeros")
    if np.abs(norms - 1).max() > 1e-4:
        x = x / norms[:, None] if x is features else np.divide(x, norms[:, None], out=x)
    return x


def _normalised(sums: torch.Tensor, previous: np.ndarray) -> np.ndarray:
    norms = sums.norm(dim=1, keepdim=True)
    centroids = (sums / norms.clamp_min(1e-30)).to(torch.float32).numpy()
    empty = (norms[:, 0] == 0).numpy()
    centroids[empty] = previous[empty]  # an empty (or cancelling) cluster keeps its centroid
    return np.ascontiguousarray(centroids)


def _initial_centroids(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(x[np.sort(rng.choice(x.shape[0], k, replace=False))])


def balanced_spherical_kmeans(
    features: np.ndarray,
    num_clusters: int,
    *,
    seed: int = 0,
    max_iter: int = 50,
    tol: float = 0.0,
    block_size: int = DEFAULT_BLOCK,
    progress: Progress | None = None,
) -> KMeansResult:
    """Spherical k-means whose clusters have sizes ``N // K`` or ``N // K + 1``, never other.

    Args:
        features: ``N x D`` rows (normalised here if they are not unit rows already; float32
            unit rows are used in place, without a copy).
        num_clusters: K, at most N.
        seed: picks the initial centroids (K distinct random points) and the price subsample;
            the same inputs and seed give the same result on the same machine.
        max_iter: Lloyd iteration cap.
        tol: stop once at most this fraction of points changed cluster in an iteration
            (0: stop only when the assignment is unchanged).
        block_size: points per similarity matrix multiply.
        progress: called after every iteration with ``(iteration, objective)``.

    Returns:
        A :class:`KMeansResult`; ``labels`` meet :func:`balanced_sizes` exactly.
    """
    x = _as_unit_rows(features)
    n = x.shape[0]
    _check_k(n, num_clusters)
    rng = np.random.default_rng(seed)
    centroids = _initial_centroids(x, num_clusters, rng)
    capacities = balanced_sizes(n, num_clusters)
    x_t = torch.from_numpy(x)
    similarity = np.empty((n, num_clusters), dtype=np.float32)
    sim_t = torch.from_numpy(similarity)
    labels = np.full(n, -1, dtype=np.int64)
    sums: np.ndarray | None = None
    prices: np.ndarray | None = None
    objective = 0.0
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        centroid_t = torch.from_numpy(centroids)
        for start in range(0, n, block_size):
            torch.mm(
                x_t[start : start + block_size], centroid_t.T, out=sim_t[start : start + block_size]
            )
        # Iterations before the last are balanced to within the Newton steps' few points (each
        # an optimum for its own sizes); the shortest-path finish makes the result exact.
        last = iteration == max_iter
        new_labels, prices = balanced_assignment(
            similarity, capacities, prices=prices, seed=seed + iteration, exact=last
        )
        changed = int((new_labels != labels).sum())
        converged = changed <= tol * n
        if converged and not last:
            new_labels, prices = balanced_assignment(
                similarity, capacities, prices=prices, seed=seed + iteration
            )
        if sums is None or changed > n // _FRESH_SUMS:
            sums = kernels.cluster_sums(x, new_labels, num_clusters)
        else:  # most rows stayed put: only the movers are read
            kernels.move_sums(x, labels, new_labels, sums)
        labels = new_labels
        objective = float(
            np.take_along_axis(similarity, labels[:, None], axis=1).sum(dtype=np.float64)
        )
        centroids = _normalised(torch.from_numpy(sums), centroids)
        if progress is not None:
            progress(iteration, objective)
        if converged:
            break
    return KMeansResult(
        centroids=centroids,
        labels=labels,
        objective=objective,
        iterations=iteration,
        converged=converged,
        prices=np.asarray(prices, dtype=np.float64),
    )


def _check_k(n: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"the number of clusters must be at least 1, got {k}")
    if k > n:
        raise ValueError(f"cannot split {n} points into {k} non-empty clusters")


def nearest_assignment(
    features: np.ndarray, centroids: np.ndarray, block_size: int = DEFAULT_BLOCK
) -> np.ndarray:
    """Index of the most similar centroid for every row (what the authors' code does; sizes
    are whatever falls out)."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(x.shape[0], dtype=np.int64)
    for start in range(0, x.shape[0], block_size):
        labels[start : start + block_size] = (x[start : start + block_size] @ c.T).argmax(1).numpy()
    return labels


def spherical_kmeans(
    features: np.ndarray, num_clusters: int, *, seed: int = 0, max_iter: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Unbalanced spherical k-means with faiss, on every point (no subsampling).

    Returns:
        ``(centroids, labels)``: ``K x D`` float32 unit rows and ``N`` int64 ids.
    """
    import faiss

    x = _as_unit_rows(features)
    _check_k(x.shape[0], num_clusters)
    kmeans = faiss.Kmeans(
        x.shape[1],
        num_clusters,
        niter=max_iter,
        spherical=True,
        seed=seed,
        # faiss trains on 256 points per centroid by default; the plan must use all of them.
        max_points_per_centroid=max(256, -(-x.shape[0] // num_clusters)),
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(x)
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    return centroids, nearest_assignment(x, centroids)


def _weighted_balanced_kmeans(
    means: np.ndarray,
    mass: np.ndarray,
    sums: np.ndarray,
    num_clusters: int,
    *,
    seed: int,
    max_iter: int,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int, bool]:
    """Balanced k-means over weighted rows (fine clusters): returns the flow matrix.

    ``means[j]`` is the mean of fine cluster j's points (not normalised), so ``means @ c`` is
    their average cosine to centroid ``c``; ``sums[j] = mass[j] * means[j]``.
    """
    rows = means.shape[0]
    total = int(mass.sum())
    capacities = balanced_sizes(total, num_clusters)
    rng = np.random.default_rng(seed)
    centroids = np.ascontiguousarray(
        (sums[rng.choice(rows, num_clusters, replace=False)]), dtype=np.float32
    )
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    flow = np.zeros((rows, num_clusters))
    prices = np.zeros(num_clusters)
    objective = 0.0
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007  (the count is returned)
        similarity = np.ascontiguousarray(means @ centroids.T, dtype=np.float32)
        piece_row, piece_cluster, piece_mass, prices = _auction(
            similarity, capacities, prices, mass.astype(np.float64), epsilon
        )
        new_flow = np.zeros((rows, num_clusters))
        np.add.at(new_flow, (piece_row, piece_cluster), piece_mass)
        converged = bool(np.array_equal(new_flow, flow))
        flow = new_flow
        objective = float((flow * similarity).sum())
        coarse_sums = (flow / mass[:, None]).T @ sums.astype(np.float64)
        centroids = _normalised(torch.from_numpy(coarse_sums), centroids)
        if converged:
            break
    return flow, centroids, prices, objective, iterations, converged


def two_stage_balanced_kmeans(
    features: np.ndarray,
    num_clusters: int,
    *,
    fine_clusters: int = 1024,
    balance: Literal["samples", "clusters"] = "samples",
    seed: int = 0,
    max_iter: int = 50,
    fine_iter: int = 20,
    block_size: int = DEFAULT_BLOCK,
    epsilon: float = DEFAULT_EPSILON,
) -> TwoStageResult:
    """Fine unbalanced clusters (faiss), then a balanced clustering of them into K.

    Args:
        features: ``N x D`` rows.
        num_clusters: K coarse clusters, at most the number of fine clusters.
        fine_clusters: F, clipped to N.
        balance: ``"samples"`` (default): coarse clusters hold ``N // K`` or ``N // K + 1``
            points; a fine cluster may be split (at most K - 1 are), and the points of a split
            one go, within its quotas, to the coarse centroids they are closest to.
            ``"clusters"`` (the authors' variant): coarse clusters hold equally many fine
            clusters, and point counts are whatever follows.
        seed: seeds both stages.
        max_iter: coarse Lloyd iteration cap.
        fine_iter: fine (faiss) iterations.
        block_size: points per similarity matrix multiply.
        epsilon: per-unit optimality tolerance of the coarse (weighted) balanced step.

    Returns:
        A :class:`TwoStageResult`.
    """
    if balance not in ("samples", "clusters"):
        raise ValueError(f"balance must be 'samples' or 'clusters', got {balance!r}")
    x = _as_unit_rows(features)
    n = x.shape[0]
    fine = min(fine_clusters, n)
    _check_k(fine, num_clusters)
    fine_centroids, fine_labels = spherical_kmeans(x, fine, seed=seed, max_iter=fine_iter)
    x_t = torch.from_numpy(x)
    sums = kernels.cluster_sums(x, fine_labels, fine)
    mass = np.bincount(fine_labels, minlength=fine).astype(np.float64)
    used = np.flatnonzero(mass > 0)  # faiss may leave a fine cluster without nearest points
    if used.size < num_clusters:
        raise ValueError(
            f"only {used.size} non-empty fine clusters, fewer than {num_clusters} coarse ones"
        )
    if balance == "clusters":
        coarse = balanced_spherical_kmeans(
            fine_centroids[used], num_clusters, seed=seed, max_iter=max_iter
        )
        of_fine = np.full(fine, -1, dtype=np.int64)
        of_fine[used] = coarse.labels
        labels = of_fine[fine_labels]
        similarity = _similarity_to(x_t, coarse.centroids, labels, block_size)
        result = KMeansResult(
            centroids=coarse.centroids,
            labels=labels,
            objective=similarity,
            iterations=coarse.iterations,
            converged=coarse.converged,
            prices=coarse.prices,
        )
        return TwoStageResult(result, fine_centroids, fine_labels)
    means = sums[used] / mass[used, None]
    flow, centroids, prices, _, iterations, converged = _weighted_balanced_kmeans(
        means, mass[used], sums[used], num_clusters, seed=seed, max_iter=max_iter, epsilon=epsilon
    )
    labels = np.full(n, -1, dtype=np.int64)
    order = np.argsort(fine_labels, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(fine_labels, minlength=fine))]
    c_t = torch.from_numpy(centroids)
    for row, fine_id in enumerate(used):
        members = order[bounds[fine_id] : bounds[fine_id + 1]]
        quota = np.rint(flow[row]).astype(np.int64)
        targets = np.flatnonzero(quota)
        if targets.size == 1:
            labels[members] = targets[0]
            continue
        # A split fine cluster: its points go to the coarse centroids they are closest to,
        # within the quotas the coarse step gave each of them.
        local = (x_t[members] @ c_t[targets].T).numpy()
        chosen, _ = balanced_assignment(local, quota[targets], seed=seed)
        labels[members] = targets[chosen]
    objective = _similarity_to(x_t, centroids, labels, block_size)
    result = KMeansResult(centroids, labels, objective, iterations, converged, prices)
    return TwoStageResult(result, fine_centroids, fine_labels)


def _similarity_to(
    x: torch.Tensor, centroids: np.ndarray, labels: np.ndarray, block_size: int
) -> float:
    """Total cosine of every point to its own centroid."""
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    total = 0.0
    for start in range(0, x.shape[0], block_size):
        own = c[torch.from_numpy(labels[start : start + block_size])]
        total += float((x[start : start + block_size] * own).sum(dtype=torch.float64))
    return total
