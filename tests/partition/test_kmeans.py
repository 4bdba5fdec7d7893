"""Balanced assignment and k-means: exact sizes, optimality against exact solvers, determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment, linprog

from coordinator.partition import kmeans_kernels
from coordinator.partition.auction import auction
from coordinator.partition.balanced_assignment import priced_argmax
from coordinator.partition.cluster_sums import cluster_sums, move_sums
from coordinator.partition.kmeans import (
    balanced_assignment,
    balanced_sizes,
    balanced_spherical_kmeans,
    nearest_assignment,
    two_stage_balanced_kmeans,
)


def unit_rows(n: int, d: int, seed: int, centres: int = 0, spread: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if centres:
        c = rng.standard_normal((centres, d)).astype(np.float32)
        x = c[rng.integers(0, centres, n)] + spread * x
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def lap_optimum(similarity: np.ndarray, capacities: np.ndarray) -> float:
    """Exact optimum: the Hungarian method on the matrix with each cluster replicated."""
    columns = np.repeat(np.arange(similarity.shape[1]), capacities)
    rows, cols = linear_sum_assignment(-similarity[:, columns].astype(np.float64))
    return float(similarity[rows, columns[cols]].astype(np.float64).sum())


def total(similarity: np.ndarray, labels: np.ndarray) -> float:
    return float(similarity[np.arange(len(labels)), labels].astype(np.float64).sum())


def test_balanced_sizes_differ_by_at_most_one() -> None:
    assert balanced_sizes(10, 3).tolist() == [4, 3, 3]
    assert balanced_sizes(9, 3).tolist() == [3, 3, 3]
    assert balanced_sizes(2, 5).tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError):
        balanced_sizes(3, 0)


@pytest.mark.parametrize(("n", "k", "seed"), [(1003, 10, 0), (500, 7, 1), (37, 5, 2), (64, 8, 3)])
def test_assignment_matches_exact_lap_optimum(n: int, k: int, seed: int) -> None:
    similarity = np.random.default_rng(seed).uniform(-1, 1, (n, k)).astype(np.float32)
    labels, _ = balanced_assignment(similarity)
    capacities = balanced_sizes(n, k)
    assert np.bincount(labels, minlength=k).tolist() == capacities.tolist()
    # Within N * epsilon of the optimum, far inside the 99.9 % bar.
    assert total(similarity, labels) >= lap_optimum(similarity, capacities) - n * 1e-6


def test_assignment_on_clustered_cosines_is_optimal_from_bad_prices() -> None:
    x = unit_rows(1500, 16, seed=4, centres=5)
    c = unit_rows(6, 16, seed=5)
    similarity = x @ c.T
    capacities = balanced_sizes(1500, 6)
    bad_prices = np.array([3.0, -2.0, 0.0, 1.0, 0.5, -1.0])
    labels, prices = balanced_assignment(similarity, prices=bad_prices)
    assert np.bincount(labels, minlength=6).tolist() == capacities.tolist()
    assert total(similarity, labels) >= lap_optimum(similarity, capacities) * 0.99999
    # The returned prices certify the assignment: every row is within epsilon of its best.
    values = similarity - prices
    assert np.all(values[np.arange(1500), labels] >= values.max(axis=1) - 2e-6)


def test_uneven_capacities_are_met() -> None:
    similarity = np.random.default_rng(6).uniform(size=(200, 4)).astype(np.float32)
    capacities = np.array([120, 50, 30, 0])
    labels, _ = balanced_assignment(similarity, capacities)
    assert np.bincount(labels, minlength=4).tolist() == capacities.tolist()
    assert total(similarity, labels) >= lap_optimum(similarity, capacities) - 200 * 1e-6
    with pytest.raises(ValueError, match="summing to 200"):
        balanced_assignment(similarity, np.array([1, 2, 3, 4]))


def test_large_instance_agrees_with_the_auction() -> None:
    x = unit_rows(20_000, 16, seed=7, centres=12)
    c = unit_rows(9, 16, seed=8)
    similarity = np.ascontiguousarray(x @ c.T)
    capacities = balanced_sizes(20_000, 9)
    labels, _ = balanced_assignment(similarity)
    assert np.bincount(labels, minlength=9).tolist() == capacities.tolist()
    rows, clusters, _, _ = auction(similarity, capacities, np.zeros(9))
    full = np.empty(20_000, dtype=np.int64)
    full[rows] = clusters
    assert abs(total(similarity, labels) - total(similarity, full)) <= 20_000 * 2e-6


@pytest.mark.parametrize("k", [1, 2, 7, 130])
def test_priced_top2_matches_numpy(k: int) -> None:
    rng = np.random.default_rng(k)
    similarity = rng.uniform(-1, 1, (500, k)).astype(np.float32)
    similarity[:50] = np.round(similarity[:50], 1)  # ties: the first best column wins
    prices = rng.normal(size=k)
    labels, margins, runner_up = priced_argmax(similarity, prices)
    values = similarity.astype(np.float64) - prices
    assert np.array_equal(labels, values.argmax(axis=1))
    if k == 1:
        assert np.isinf(margins).all()
        return
    rows = np.arange(500)
    second = values.copy()
    second[rows, labels] = -np.inf
    assert np.array_equal(runner_up, second.argmax(axis=1))
    assert np.allclose(margins, values[rows, labels] - second.max(axis=1), atol=1e-6)


def test_priced_top2_ties_signed_zeros_and_negatives_as_floats_compare() -> None:
    """The kernel compares integer keys made from the floats' bits: -0.0 must still tie with
    +0.0 (the first wins), and negative values must order by value, not by bit pattern."""
    similarity = np.array(
        [[-0.0, 0.0, -1.0], [-2.0, -0.5, -0.25], [0.0, -0.0, 0.0], [-3.0, -3.0, -4.0]],
        dtype=np.float32,
    )
    labels, margins, runner_up = priced_argmax(similarity, np.zeros(3))
    assert labels.tolist() == [0, 2, 0, 0]
    assert runner_up.tolist() == [1, 1, 1, 1]
    assert margins.tolist() == [0.0, 0.25, 0.0, 0.0]


@pytest.mark.parametrize(
    ("n", "k", "check_lap", "threads"), [(3000, 16, True, 3), (6000, 64, False, 2)]
)
def test_shortest_paths_keep_every_row_in_a_best_priced_cluster(
    n: int, k: int, check_lap: bool, threads: int
) -> None:
    """The exact finish from prices far from balance (many over-full clusters, so each
    Dijkstra takes many paths at once): sizes exact, and the returned prices certify
    optimality row by row (by LP duality), so the incremental move matrix stayed right."""
    rng = np.random.default_rng(13)
    similarity = rng.uniform(-1, 1, (n, k)).astype(np.float32)
    similarity[:, : k // 4] += 0.3  # a quarter of the clusters attract most rows
    capacities = balanced_sizes(n, k)
    prices = np.zeros(k)
    start, _, _ = priced_argmax(similarity, prices)
    labels, final = kmeans_kernels.unit_shortest_paths(
        similarity, capacities, prices, start, threads
    )
    assert np.bincount(labels, minlength=k).tolist() == capacities.tolist()
    values = similarity.astype(np.float64) - final
    assert np.all(values[np.arange(n), labels] >= values.max(axis=1) - 1e-6)
    if check_lap:
        assert total(similarity, labels) >= lap_optimum(similarity, capacities) - n * 1e-6
    assert np.array_equal(prices, np.zeros(k))  # the caller's prices are not touched


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=240),
    k=st.integers(min_value=1, max_value=12),
    seed=st.integers(min_value=0, max_value=2**16),
    ties=st.booleans(),
)
def test_property_sizes_differ_by_at_most_one(n: int, k: int, seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    similarity = rng.uniform(-1, 1, (n, k)).astype(np.float32)
    if ties:  # duplicated rows and columns: many exact ties
        similarity = np.round(similarity, 1)
        similarity[: n // 2] = similarity[0]
    labels, _ = balanced_assignment(similarity, prices=rng.normal(size=k))
    sizes = np.bincount(labels, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    assert sizes.tolist() == balanced_sizes(n, k).tolist()


@settings(max_examples=10, deadline=None)
@given(n=st.integers(min_value=3, max_value=400), k=st.integers(min_value=1, max_value=9))
def test_property_kmeans_sizes_for_any_n_and_k(n: int, k: int) -> None:
    k = min(k, n)
    result = balanced_spherical_kmeans(unit_rows(n, 8, seed=n * 31 + k), k, seed=1, max_iter=10)
    sizes = np.bincount(result.labels, minlength=k)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n


def test_kmeans_is_deterministic_for_a_seed() -> None:
    x = unit_rows(3001, 12, seed=9, centres=6)
    a = balanced_spherical_kmeans(x, 7, seed=3)
    b = balanced_spherical_kmeans(x, 7, seed=3)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.centroids, b.centroids)
    assert sorted(set(np.bincount(a.labels).tolist())) == [428, 429]
    assert np.allclose(np.linalg.norm(a.centroids, axis=1), 1, atol=1e-5)
    assert a.converged and a.iterations < 50


def test_kmeans_recovers_equal_well_separated_clusters() -> None:
    rng = np.random.default_rng(10)
    centres = np.eye(4, 32, dtype=np.float32) * 5
    truth = np.repeat(np.arange(4), 100)
    x = centres[truth] + rng.standard_normal((400, 32)).astype(np.float32) * 0.3
    result = balanced_spherical_kmeans(x, 4, seed=0)  # rows are normalised inside
    for cluster in range(4):
        assert len(set(truth[result.labels == cluster].tolist())) == 1


def test_kmeans_objective_never_decreases() -> None:
    objectives: list[float] = []
    balanced_spherical_kmeans(
        unit_rows(2000, 8, seed=11, centres=3),
        5,
        seed=2,
        progress=lambda _i, o: objectives.append(o),
    )
    assert all(b >= a - 1e-3 for a, b in itertools.pairwise(objectives))


def test_kmeans_rejects_bad_inputs() -> None:
    x = unit_rows(5, 4, seed=12)
    with pytest.raises(ValueError, match="5 points into 6"):
        balanced_spherical_kmeans(x, 6)
    with pytest.raises(ValueError, match="all zeros"):
        balanced_spherical_kmeans(np.zeros((5, 4), np.float32), 2)
    with pytest.raises(ValueError, match="2-D"):
        balanced_spherical_kmeans(np.zeros(5, np.float32), 2)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2 is not finite"):
        balanced_spherical_kmeans(bad, 2)
    assert np.bincount(balanced_spherical_kmeans(x, 5).labels).tolist() == [1] * 5


def test_weighted_auction_matches_linear_program() -> None:
    rng = np.random.default_rng(13)
    rows, k = 30, 4
    similarity = rng.uniform(-1, 1, (rows, k)).astype(np.float32)
    mass = rng.integers(1, 20, rows).astype(np.float64)
    capacities = balanced_sizes(int(mass.sum()), k)
    piece_row, piece_cluster, piece_mass, _ = auction(similarity, capacities, np.zeros(k), mass)
    flow = np.zeros((rows, k))
    np.add.at(flow, (piece_row, piece_cluster), piece_mass)
    assert np.allclose(flow.sum(axis=1), mass)
    assert np.allclose(flow.sum(axis=0), capacities)
    a_eq = np.vstack([np.kron(np.eye(rows), np.ones(k)), np.kron(np.ones(rows), np.eye(k))])
    exact = linprog(
        -similarity.ravel().astype(np.float64),
        A_eq=a_eq,
        b_eq=np.concatenate([mass, capacities]),
        method="highs",
    )
    assert (flow * similarity).sum() >= -exact.fun - mass.sum() * 1e-6


def test_two_stage_balances_samples_even_when_k_does_not_divide_n() -> None:
    x = unit_rows(2003, 16, seed=14, centres=8)
    staged = two_stage_balanced_kmeans(x, 6, fine_clusters=64, seed=0)
    sizes = np.bincount(staged.result.labels, minlength=6)
    assert sizes.tolist() == balanced_sizes(2003, 6).tolist()
    assert staged.fine_centroids.shape == (64, 16)
    # Coarse clusters are unions of fine clusters, except for at most K - 1 split ones.
    split = [f for f in range(64) if len(set(staged.result.labels[staged.fine_labels == f])) > 1]
    assert len(split) <= 5
    again = two_stage_balanced_kmeans(x, 6, fine_clusters=64, seed=0)
    assert np.array_equal(again.result.labels, staged.result.labels)


def test_two_stage_cluster_balance_is_the_authors_variant() -> None:
    x = unit_rows(1200, 16, seed=15, centres=5)
    staged = two_stage_balanced_kmeans(x, 3, fine_clusters=30, balance="clusters", seed=0)
    labels, fine = staged.result.labels, staged.fine_labels
    coarse_of_fine = {int(f): int(labels[fine == f][0]) for f in np.unique(fine)}
    per_coarse = np.bincount(list(coarse_of_fine.values()), minlength=3)
    assert per_coarse.max() - per_coarse.min() <= 1
    for f, c in coarse_of_fine.items():
        assert set(labels[fine == f].tolist()) == {c}
    with pytest.raises(ValueError, match="balance"):
        two_stage_balanced_kmeans(x, 3, balance="tokens")  # type: ignore[arg-type]


def test_nearest_assignment_is_the_argmax() -> None:
    x = unit_rows(300, 8, seed=16)
    c = unit_rows(5, 8, seed=17)
    assert np.array_equal(nearest_assignment(x, c, block_size=64), (x @ c.T).argmax(axis=1))


@pytest.mark.parametrize("n", [3, 1001])
def test_cluster_sums_match_numpy(n: int) -> None:
    """Summed over fixed row ranges in parallel: every row counted once, in its own cluster,
    including when N is smaller than the number of ranges."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 7)).astype(np.float32)
    labels = rng.integers(0, 5, n)
    expected = np.zeros((5, 7))
    np.add.at(expected, labels, x.astype(np.float64))
    assert np.allclose(cluster_sums(x, labels, 5), expected, rtol=0, atol=1e-12)


def test_move_sums_match_fresh_sums() -> None:
    """Updating sums from the rows that changed cluster gives the sums of the new labels."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    old = rng.integers(0, 4, 500)
    new = old.copy()
    movers = rng.choice(500, 60, replace=False)
    new[movers] = rng.integers(0, 4, 60)
    sums = cluster_sums(x, old, 4)
    move_sums(x, old, new, sums)
    assert np.allclose(sums, cluster_sums(x, new, 4), rtol=0, atol=1e-12)
    assert not np.allclose(sums, cluster_sums(x, old, 4), rtol=0, atol=1e-3)


@pytest.mark.parametrize("first", [0, 1, 37, 60, 61])
def test_two_clusters_are_optimal_and_certified(first: int) -> None:
    """K = 2 is one selection by gain: sizes exact, total equal to the LAP optimum, and the
    returned prices leave every row in a best priced cluster (ties included)."""
    rng = np.random.default_rng(first)
    similarity = rng.uniform(-1, 1, (61, 2)).astype(np.float32)
    similarity[:10] = np.round(similarity[:10], 1)  # tied gains at the boundary
    capacities = np.array([first, 61 - first])
    labels, prices = balanced_assignment(similarity, capacities)
    assert np.bincount(labels, minlength=2).tolist() == capacities.tolist()
    assert total(similarity, labels) >= lap_optimum(similarity, capacities) - 1e-5
    values = similarity.astype(np.float64) - prices
    assert np.all(values[np.arange(61), labels] >= values.max(axis=1) - 1e-9)


@pytest.mark.parametrize(("tol", "iterations"), [(1.0, 1), (-1.0, 3)])
def test_result_is_exact_whether_it_converges_or_hits_the_cap(tol: float, iterations: int) -> None:
    """Iterations before the last are only balanced to within Newton's few points (N here is
    large enough for Newton): the iteration that converges, or the last, is finished
    exactly, so the result's sizes differ by at most one either way."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6001, 8)).astype(np.float32)
    x[:3000, 0] += 3.0  # uneven natural clusters, so balance has to be imposed
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    result = balanced_spherical_kmeans(x, 7, seed=1, max_iter=3, tol=tol)
    assert result.iterations == iterations
    assert result.converged == (tol > 0)
    assert np.bincount(result.labels, minlength=7).tolist() == balanced_sizes(6001, 7).tolist()
