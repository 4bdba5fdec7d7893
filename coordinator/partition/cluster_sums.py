"""Per-cluster sums of the rows (compiled, numba): the Lloyd step's centroid update.

A centroid is the normalised sum of its cluster's rows. :func:`cluster_sums` computes every
sum afresh; :func:`move_sums` updates them from the rows that changed cluster, which is cheaper
once the assignment has nearly settled. Both add in float64, in an order that does not depend
on the thread count, so the sums (and so the centroids) are the same on every machine.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["cluster_sums", "move_sums"]


# Row ranges summed separately (in parallel) and then added, in this fixed order whatever the
# thread count, so the sums do not depend on the machine.
_SUM_PARTS = 4


@njit(cache=True, nogil=True, parallel=True)
def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``K x D`` float64 sums of the rows of each cluster (float64 accumulators keep
    million-row sums independent of the order they are added in, to float32 precision)."""
    n, d = x.shape
    partial = np.zeros((_SUM_PARTS, k, d))
    for part in prange(_SUM_PARTS):
        for i in range(part * n // _SUM_PARTS, (part + 1) * n // _SUM_PARTS):
            sums = partial[part, labels[i]]
            row = x[i]
            for j in range(d):
                sums[j] += row[j]
    total = partial[0].copy()
    for part in range(1, _SUM_PARTS):
        total += partial[part]
    return total


@njit(cache=True, nogil=True)
def move_sums(
    x: np.ndarray, old_labels: np.ndarray, new_labels: np.ndarray, sums: np.ndarray
) -> None:
    """Updates :func:`cluster_sums` of ``old_labels`` in place to those of ``new_labels``:
    only rows that changed cluster are read, which late in a fit is a small share of them.
    The float64 sums then differ from a fresh sum by rounding far below float32 precision."""
    n, d = x.shape
    for i in range(n):
        old, new = old_labels[i], new_labels[i]
        if old != new:
            row = x[i]
            for j in range(d):
                sums[old, j] -= row[j]
                sums[new, j] += row[j]
