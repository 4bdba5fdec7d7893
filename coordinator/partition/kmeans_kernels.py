"""The compiled inner loops of the balanced assignment (numba).

Two loops dominate balanced k-means on a CPU and neither vectorises well in numpy:

* the best and second-best *priced* cluster of every row (``similarity - prices``), read once
  per Newton step and once per Lloyd iteration over an ``N x K`` matrix;
* the exact finish, successive shortest paths on the K-node cluster graph, where each step is a
  small dense Dijkstra plus a rescan of the clusters on the path: thousands of tiny steps whose
  cost in numpy is call overhead, not arithmetic.

Both are written here as plain loops and compiled once (``cache=True`` keeps the machine code
next to this file, or in numba's per-user cache when the package directory is read-only).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_ROWS_PER_TASK = 1024
_INDEX_BITS = np.int64(0xFFFFFFFF)


@njit(cache=True, nogil=True, parallel=True)
def priced_top2(
    similarity: np.ndarray,
    prices: np.ndarray,
    labels: np.ndarray,
    margins: np.ndarray,
    runner_up: np.ndarray,
) -> None:
    """For every row: the cluster maximising ``similarity - prices`` (first one on ties), its
    lead over the second best, and the second best; written into the three output arrays.

    With one cluster the margin is infinite and the runner-up is the cluster itself. Rows are
    split across numba's threads (rows are independent).
    """
    n, k = similarity.shape
    # Compared in float32 (the similarities' own precision), the chosen pair's margin
    # recomputed in float64. LLVM will not vectorise a float max with an index, but it does an
    # integer max: so each priced value becomes an int64 key that orders like the float (its
    # bits, negatives flipped) in the high half and ``2**32 - 1 - cluster`` in the low half, and
    # one vectorised max gives the best value and its first cluster (2.4x faster at K = 128).
    price32 = prices.astype(np.float32)
    lowest = np.int64(np.iinfo(np.int64).min)
    tasks = (n + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(tasks):
        priced = np.empty(k, np.float32)
        bits = priced.view(np.int32)
        keys = np.empty(k, np.int64)
        for i in range(task * _ROWS_PER_TASK, min(n, (task + 1) * _ROWS_PER_TASK)):
            for a in range(k):
                priced[a] = similarity[i, a] - price32[a]
            best = lowest
            for a in range(k):
                x = np.int64(bits[a])
                x ^= (x >> 31) & 0x7FFFFFFF
                x = x if x != -1 else np.int64(0)  # -0.0 ties with +0.0, as floats compare
                key = (x << 32) | (_INDEX_BITS - a)
                keys[a] = key
                best = key if key > best else best
            second = lowest
            for a in range(k):
                other = keys[a] if keys[a] != best else lowest
                second = other if other > second else second
            arg = _INDEX_BITS - (best & _INDEX_BITS)
            labels[i] = arg
            if k == 1:
                margins[i] = np.inf
                runner_up[i] = arg
            else:
                second_arg = _INDEX_BITS - (second & _INDEX_BITS)
                margins[i] = (np.float64(similarity[i, arg]) - prices[arg]) - (
                    np.float64(similarity[i, second_arg]) - prices[second_arg]
                )
                runner_up[i] = second_arg


@njit(cache=True, nogil=True)
def shortest_path_tree(
    move: np.ndarray, prices: np.ndarray, excess: np.ndarray, wanted: int
) -> tuple[np.ndarray, int, np.ndarray]:
    """Dijkstra on the dense cluster graph from every over-full cluster at once, until
    ``wanted`` clusters with room are settled; the edge ``a -> b`` costs
    ``move[a, b] - p_a + p_b`` (>= 0 up to rounding, clamped at 0; ``inf`` where no row can
    move).

    Raises every settled cluster's price by how much closer it is than the last settled sink
    (the Hungarian method's dual update, in place). Afterwards every reduced cost is still
    non-negative and every tree edge into a settled cluster costs zero, so the tree path to
    each settled sink is a shortest augmenting path under the new prices.

    Returns:
        ``(sinks, found, parent)``: the first ``found`` entries of ``sinks`` are the settled
        clusters with room, nearest first; a path is ``parent[...parent[sink]...], ..., sink``.
    """
    k = move.shape[0]
    distance = np.full(k, np.inf)
    parent = np.full(k, -1, dtype=np.int64)
    settled = np.zeros(k, dtype=np.bool_)
    sinks = np.empty(k, dtype=np.int64)
    found = 0
    for a in range(k):
        if excess[a] > 0:
            distance[a] = 0.0
    reach = 0.0
    while found < wanted:
        u = -1
        nearest = np.inf
        for a in range(k):
            if not settled[a] and distance[a] < nearest:
                nearest = distance[a]
                u = a
        if u < 0:
            break
        settled[u] = True
        reach = nearest
        if excess[u] < 0:
            sinks[found] = u
            found += 1
        for v in range(k):
            if settled[v] or move[u, v] == np.inf:
                continue
            candidate = nearest + max(move[u, v] - prices[u] + prices[v], 0.0)
            if candidate < distance[v]:
                distance[v] = candidate
                parent[v] = u
    if found > 0:
        for a in range(k):
            if settled[a] and distance[a] < reach:
                prices[a] += reach - distance[a]
    return sinks, found, parent


# How many of the cheapest moves out of cluster ``a`` into ``b`` are kept, cheapest first. A
# row leaving ``a`` forces a rescan of ``a``'s members only when it empties a list; deeper
# lists cost more to build. 4 is fastest from 32k to 1M rows at K = 128 (the finish at 1M:
# 0.26 s against 0.81 s keeping only the cheapest; 0.32 s with 8).
_MOVE_DEPTH = 4

MoveLists = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Per pair of clusters ``(a, b)``: the cheapest moves' costs and rows (``K x K x depth``,
sorted), how many are kept (``K x K``), and whether they are all of ``a``'s members."""


@njit(cache=True, nogil=True)
def _insert(costs: np.ndarray, rows: np.ndarray, length: int, cost: float, row: int) -> int:
    """Puts ``(cost, row)`` into a list sorted by cost; the last entry falls off a full list.
    Returns the new length."""
    depth = costs.shape[0]
    j = min(length, depth - 1)
    while j > 0 and costs[j - 1] > cost:
        costs[j] = costs[j - 1]
        rows[j] = rows[j - 1]
        j -= 1
    costs[j] = cost
    rows[j] = row
    return min(length + 1, depth)


@njit(cache=True, nogil=True)
def _rescan(
    similarity: np.ndarray,
    members: np.ndarray,
    count: np.ndarray,
    a: int,
    b: int,
    lists: MoveLists,
) -> None:
    """The cheapest moves of members of cluster ``a`` into ``b``, price-free (``s_ia - s_ib``;
    the prices enter as ``- p_a + p_b`` in :func:`shortest_path_tree`)."""
    cheap_cost, cheap_row, cheap_len, complete = lists
    depth = cheap_cost.shape[2]
    length = 0
    for j in range(count[a]):
        row = members[a, j]
        cost = np.float64(similarity[row, a]) - np.float64(similarity[row, b])
        if length < depth or cost < cheap_cost[a, b, depth - 1]:
            length = _insert(cheap_cost[a, b], cheap_row[a, b], length, cost, row)
    cheap_len[a, b] = length
    complete[a, b] = count[a] <= depth


@njit(cache=True, nogil=True, parallel=True)
def _first_moves(
    similarity: np.ndarray,
    labels: np.ndarray,
    count: np.ndarray,
    lists: MoveLists,
    parts: int,
) -> None:
    """Every cluster's lists of cheapest moves, from scratch. Each of ``parts`` tasks (one per
    thread) reads the rows in memory order and keeps those of its own clusters
    (``a mod parts``), so no two tasks write the same list."""
    n, k = similarity.shape
    cheap_cost, cheap_row, cheap_len, complete = lists
    depth = cheap_cost.shape[2]
    for part in prange(parts):
        # Below a full list's last cost a row cannot enter it: one vectorised pass per row
        # finds out whether any of its moves can, and most rows can enter none.
        bound = np.full((k, k), np.inf)
        costs = np.empty(k)
        for i in range(n):
            a = labels[i]
            if a % parts != part:
                continue
            own = np.float64(similarity[i, a])
            hits = 0
            for b in range(k):
                costs[b] = own - np.float64(similarity[i, b])
                hits += costs[b] < bound[a, b]
            if hits == 0:
                continue
            for b in range(k):
                if b != a and costs[b] < bound[a, b]:
                    length = _insert(
                        cheap_cost[a, b], cheap_row[a, b], cheap_len[a, b], costs[b], i
                    )
                    cheap_len[a, b] = length
                    if length == depth:
                        bound[a, b] = cheap_cost[a, b, depth - 1]
        for a in range(part, k, parts):
            for b in range(k):
                complete[a, b] = count[a] <= depth


@njit(cache=True, nogil=True)
def _leave(
    similarity: np.ndarray,
    members: np.ndarray,
    count: np.ndarray,
    position: np.ndarray,
    row: int,
    a: int,
    lists: MoveLists,
) -> None:
    """Takes ``row`` out of cluster ``a`` and out of ``a``'s lists; a list it empties is
    rescanned (unless it held every member)."""
    cheap_cost, cheap_row, cheap_len, complete = lists
    last = members[a, count[a] - 1]
    members[a, position[row]] = last
    position[last] = position[row]
    count[a] -= 1
    for b in range(similarity.shape[1]):
        length = cheap_len[a, b]
        for j in range(length):
            if cheap_row[a, b, j] == row:
                for m in range(j, length - 1):
                    cheap_cost[a, b, m] = cheap_cost[a, b, m + 1]
                    cheap_row[a, b, m] = cheap_row[a, b, m + 1]
                cheap_len[a, b] = length - 1
                if length == 1 and not complete[a, b]:
                    _rescan(similarity, members, count, a, b, lists)
                break


@njit(cache=True, nogil=True)
def _enter(
    similarity: np.ndarray,
    members: np.ndarray,
    count: np.ndarray,
    position: np.ndarray,
    row: int,
    a: int,
    lists: MoveLists,
) -> None:
    """Puts ``row`` into cluster ``a``. A list holds the cheapest moves of ``a``'s members and
    every member left out costs at least its last entry, so the row goes in if it is cheaper
    than that (or if the list holds every member)."""
    cheap_cost, cheap_row, cheap_len, complete = lists
    depth = cheap_cost.shape[2]
    members[a, count[a]] = row
    position[row] = count[a]
    count[a] += 1
    own = np.float64(similarity[row, a])
    for b in range(similarity.shape[1]):
        if b == a:
            continue
        cost = own - np.float64(similarity[row, b])
        length = cheap_len[a, b]
        if complete[a, b] or (length > 0 and cost < cheap_cost[a, b, length - 1]):
            if length == depth:
                complete[a, b] = False
            cheap_len[a, b] = _insert(cheap_cost[a, b], cheap_row[a, b], length, cost, row)


@njit(cache=True, nogil=True)
def unit_shortest_paths(
    similarity: np.ndarray,
    capacities: np.ndarray,
    prices: np.ndarray,
    labels: np.ndarray,
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact finish for unit rows: successive shortest paths on the K-node cluster graph.

    ``labels`` must be a best priced cluster of every row under ``prices``, so every reduced
    cost starts non-negative. Each path moves one row per edge, from an over-full cluster to
    one with room; the dual update keeps every row in a best priced cluster, so the result is
    optimal for its capacities. The edge ``a -> b`` is the cheapest move out of ``a`` into
    ``b``; a short sorted list of the cheapest is kept per edge and updated incrementally (a
    row entering ``a`` may join ``a``'s lists, a row leaving drops out of them), so a rescan of
    ``a``'s members is needed only when a list runs empty. One Dijkstra settles many clusters
    with room, and every path in its tree that shares no edge or row with another is taken at
    once, so an augmentation costs a share of a ``K x K`` Dijkstra, not a pass over rows.

    ``threads`` (numba's thread count; a compiled function that asks for it cannot be cached)
    build the first lists in parallel.

    Returns:
        ``(labels, prices)``: new arrays; the labels meet the capacities exactly.
    """
    n, k = similarity.shape
    labels = labels.copy()
    prices = prices.copy()
    load = np.zeros(k, dtype=np.int64)
    for i in range(n):
        load[labels[i]] += 1
    excess = load - capacities
    remaining = 0
    for a in range(k):
        remaining += max(excess[a], 0)
    # A cluster gains at most one row per augmentation, so this width never overflows.
    members = np.empty((k, load.max() + remaining + 1), dtype=np.int64)
    count = np.zeros(k, dtype=np.int64)
    position = np.empty(n, dtype=np.int64)
    for i in range(n):
        a = labels[i]
        members[a, count[a]] = i
        position[i] = count[a]
        count[a] += 1
    # Shallower lists when K is large, so that they stay within 2**24 entries.
    depth = max(1, min(_MOVE_DEPTH, 2**24 // (k * k)))
    cheap_cost = np.empty((k, k, depth))
    cheap_row = np.zeros((k, k, depth), dtype=np.int64)
    cheap_len = np.zeros((k, k), dtype=np.int64)
    complete = np.ones((k, k), dtype=np.bool_)
    lists = (cheap_cost, cheap_row, cheap_len, complete)
    _first_moves(similarity, labels, count, lists, threads)
    move = np.empty((k, k))
    best_row = np.zeros((k, k), dtype=np.int64)
    # Per round (one Dijkstra), the paths taken must not share a tree edge or a row: a moved
    # row changes its clusters' cheapest moves, and tree edges are tight only once.
    node_round = np.full(k, -1, dtype=np.int64)
    row_round = np.full(n, -1, dtype=np.int64)
    tree_row = np.zeros(k, dtype=np.int64)
    path = np.empty(k, dtype=np.int64)
    round_ = 0
    while remaining > 0:
        for a in range(k):
            for b in range(k):
                move[a, b] = cheap_cost[a, b, 0] if cheap_len[a, b] > 0 else np.inf
                best_row[a, b] = cheap_row[a, b, 0]
        sinks, found, parent = shortest_path_tree(move, prices, excess, remaining)
        if found == 0:
            raise RuntimeError("balanced assignment: no path to a cluster with room")
        # The rows to move are fixed before any move changes the lists.
        for v in range(k):
            if parent[v] >= 0:
                tree_row[v] = best_row[parent[v], v]
        for f in range(found):
            sink = sinks[f]
            length = 0
            v = sink
            clear = True
            while parent[v] >= 0:
                if node_round[v] == round_ or row_round[tree_row[v]] == round_:
                    clear = False
                    break
                path[length] = v
                length += 1
                v = parent[v]
            if not clear or excess[v] <= 0 or excess[sink] >= 0:
                continue
            for e in range(length):
                node = path[e]
                node_round[node] = round_
                row_round[tree_row[node]] = round_
            for e in range(length - 1, -1, -1):
                node = path[e]
                row = tree_row[node]
                _leave(similarity, members, count, position, row, parent[node], lists)
                _enter(similarity, members, count, position, row, node, lists)
                labels[row] = node
            excess[v] -= 1
            excess[sink] += 1
            remaining -= 1
            if remaining == 0:
                break
        round_ += 1
    return labels, prices
