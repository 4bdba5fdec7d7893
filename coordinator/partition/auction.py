"""Balanced assignment of weighted rows: an auction on rising prices, finished exactly.

The two-stage k-means' coarse step assigns fine clusters, not points: a fine cluster of ``w``
points is one row of mass ``w``, and a heavy row may be split across clusters to meet the
capacities exactly. :func:`auction` raises the prices of over-full clusters round by round
and hands the last few units to successive shortest paths on the K-node cluster graph (the
same dual update as :mod:`coordinator.partition.balanced_assignment`'s exact finish).
"""

from __future__ import annotations

import itertools

import numpy as np

from coordinator.partition import kmeans_kernels as kernels
from coordinator.partition.balanced_assignment import priced_argmax

__all__ = ["DEFAULT_EPSILON", "auction"]

# Prices within this of optimal are good enough: cosines are in [-1, 1], so the total is within
# N * 1e-6 of the optimum, far inside the 99.9 % quality bar and above float32 noise in sums.
DEFAULT_EPSILON = 1e-6
# Auction rounds without less total excess before the exact shortest-path finish takes over,
# and the total excess below which it takes over anyway (each path settles one unit).
_AUCTION_PATIENCE = 4
_SHORTEST_PATH_EXCESS = 8


def auction(
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
    piece_cluster, margins, _ = priced_argmax(similarity, prices)
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
