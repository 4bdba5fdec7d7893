"""Exactly balanced spherical k-means, at million-sample scale on a CPU: the Lloyd loops.

The paper splits the unique images into K clusters *of equal size* (DESIGN §1). Lloyd's
algorithm stays the same -- assign every point, then move every centroid to the normalised mean
of its points -- but the assignment step becomes a transportation problem: maximise the total
cosine similarity subject to cluster ``k`` receiving exactly ``capacities[k]`` points, where the
capacities are ``N // K`` or ``N // K + 1`` (so sizes differ by at most one for any N and K).
That step is :mod:`coordinator.partition.balanced_assignment`; here are the loops around it.

* Similarities are computed block by block with one matrix multiply per block; the largest
  intermediate is the ``N x K`` similarity matrix, never an ``N x K x D`` tensor.
* Each iteration starts the assignment from the previous iteration's cluster prices.
* Centroid sums are updated from the points that changed cluster, not recomputed
  (:mod:`coordinator.partition.cluster_sums`).
* Lloyd iterations before the last stop after the Newton steps: every point is then in its
  best priced cluster, the exact optimum for cluster sizes within a few points of balanced.
  The last iteration (or the one where the assignment stops changing) is finished exactly.
* The two-stage coarse step, where a fine cluster of ``w`` points is one row of mass ``w``,
  assigns by an auction on rising prices (:mod:`coordinator.partition.auction`).

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from coordinator.partition.auction import DEFAULT_EPSILON, auction
from coordinator.partition.balanced_assignment import balanced_assignment, balanced_sizes
from coordinator.partition.cluster_sums import cluster_sums, move_sums

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
            sums = cluster_sums(x, new_labels, num_clusters)
        else:  # most rows stayed put: only the movers are read
            move_sums(x, labels, new_labels, sums)
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
        piece_row, piece_cluster, piece_mass, prices = auction(
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
    sums = cluster_sums(x, fine_labels, fine)
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
