"""Clustering a plan's images: one unit per group of images that share a sample, its feature
the group's mean direction (centred with ``--center``), then balanced spherical k-means (or
the two-stage variant) over the units, with the exact balanced assignment of every unit at the
end when the Lloyd iterations saw a subsample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from coordinator.partition import kmeans
from coordinator.partition.config import PartitionConfig

__all__ = ["ImageGroups", "Reporter", "cluster_units", "unit_rows"]

Reporter = Callable[[str, int | None], Callable[[int], None]]
"""``reporter(task, total)`` returns an ``advance(n)`` callback for a progress bar."""


class ImageGroups:
    """Union-find over image digests: images that share a sample must share an expert, so
    they are clustered as one unit (almost always a single image)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        root = self.parent.setdefault(item, item)
        while root != self.parent[root]:
            root = self.parent[root]
        while item != root:  # path compression keeps later finds flat
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # deterministic representative


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # Opposite images in one group could cancel; their group then gets an arbitrary direction.
    zero = norms[:, 0] < 1e-12
    x[zero] = 0.0
    x[zero, 0] = 1.0
    norms[zero] = 1.0
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def cluster_units(
    config: PartitionConfig, features: np.ndarray, reporter: Reporter
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Cluster ids per unit, centroids, and what the fit did (iterations, objective)."""
    k = config.experts
    n = features.shape[0]
    advance = reporter("clustering", config.max_iter)
    if config.algorithm == "two-stage":
        staged = kmeans.two_stage_balanced_kmeans(
            features,
            k,
            fine_clusters=config.fine_clusters,
            balance=config.two_stage_balance,
            seed=config.seed,
            max_iter=config.max_iter,
        )
        result = staged.result
        fit: dict[str, Any] = {"fine_clusters_used": int(staged.fine_centroids.shape[0])}
    else:
        sample = n
        if config.max_points_per_centroid is not None:
            sample = min(n, config.max_points_per_centroid * k)
        rows = np.arange(n)
        if sample < n:
            rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5A3F]))
            rows = np.sort(rng.choice(n, sample, replace=False))
        result = kmeans.balanced_spherical_kmeans(
            features[rows] if sample < n else features,
            k,
            seed=config.seed,
            max_iter=config.max_iter,
            progress=lambda _i, _o: advance(1),
        )
        fit = {"fit_points": int(sample)}
        if sample < n:
            # The fit saw a subsample; every image gets its exact balanced assignment now.
            similarity = _similarity(features, result.centroids)
            labels, _ = kmeans.balanced_assignment(similarity, prices=result.prices)
            result = kmeans.KMeansResult(
                result.centroids,
                labels,
                float(np.take_along_axis(similarity, labels[:, None], 1).sum(dtype=np.float64)),
                result.iterations,
                result.converged,
                result.prices,
            )
    labels = result.labels
    if config.assign == "nearest":
        labels = kmeans.nearest_assignment(features, result.centroids)
    fit.update(
        {
            "iterations": result.iterations,
            "converged": result.converged,
            "mean_cosine": round(result.objective / n, 6),
        }
    )
    return labels, result.centroids, fit


def _similarity(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    import torch

    out = np.empty((features.shape[0], centroids.shape[0]), dtype=np.float32)
    x, c, o = torch.from_numpy(features), torch.from_numpy(centroids), torch.from_numpy(out)
    for start in range(0, features.shape[0], kmeans.DEFAULT_BLOCK):
        torch.mm(
            x[start : start + kmeans.DEFAULT_BLOCK],
            c.T,
            out=o[start : start + kmeans.DEFAULT_BLOCK],
        )
    return out
