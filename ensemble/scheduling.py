"""Which samples of a routed call run together, at most ``batch_size`` model rows at a time.

A model call over rows of several full experts reads every one of their weights; a call over
one expert's rows reads one set. While decoding is bound by reading weights (small batches,
on a CPU or a GPU alike) a batch split between two experts therefore costs up to twice a
dense batch. Given many samples at once, :func:`batches` fills whole calls with one expert
set's samples first, so most calls cost what a dense call of the same size costs; only the
remainders (fewer than a call's worth per expert set) are packed together, and cost what a
split batch costs. Over ``N`` samples and ``K`` expert sets that is at most ``K`` calls of
remainders among about ``N / batch_size`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["batches", "slices"]


def slices(total: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most ``size`` of ``total`` items (``None``: one of all)."""
    step = size or max(1, total)
    return [slice(start, start + step) for start in range(0, total, step)]


def batches(routes: Sequence[tuple[int, ...]], batch_size: int | None) -> list[list[int]]:
    """The samples of each call, for samples routed to ``routes[i]`` (the experts sample
    ``i`` runs through: one for top-1, several for a mixture).

    A sample takes ``len(routes[i])`` rows of a call and a call takes at most ``batch_size``
    rows (one sample at least, however wide). Samples of one route fill calls of their own
    first; the remainders are packed into shared calls, largest first, each into the first
    call with room. Within a call, samples are ordered by route and then by index, so rows
    of one expert are adjacent; ``batch_size=None`` is one call of every sample.

    Raises:
        ValueError: ``batch_size`` below 1.
    """
    everyone = sorted(range(len(routes)), key=lambda i: (routes[i], i))
    if batch_size is None:
        return [everyone] if everyone else []
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in everyone:
        groups.setdefault(routes[i], []).append(i)
    calls: list[list[int]] = []
    remainders: list[list[int]] = []
    for route, members in groups.items():
        per_call = max(1, batch_size // max(1, len(route)))
        whole = len(members) - len(members) % per_call
        calls.extend(members[start : start + per_call] for start in range(0, whole, per_call))
        if whole < len(members):
            remainders.append(members[whole:])
    shared: list[tuple[int, list[int]]] = []  # (rows, samples)
    for members in sorted(remainders, key=lambda m: -_rows(m, routes)):
        rows = _rows(members, routes)
        for position, (used, samples) in enumerate(shared):
            if used + rows <= batch_size:
                shared[position] = (used + rows, samples + members)
                break
        else:
            shared.append((rows, list(members)))
    calls.extend(sorted(samples, key=lambda i: (routes[i], i)) for _, samples in shared)
    return calls


def _rows(samples: Sequence[int], routes: Sequence[tuple[int, ...]]) -> int:
    return sum(len(routes[i]) for i in samples)
