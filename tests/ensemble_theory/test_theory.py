"""The decentralisation theorem with tabular experts: the posterior-routed mixture is the
centralised model, exactly, in rational arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.tabular_experts import (
    END_OF_SEQUENCE,
    TabularModel,
    fit_partition,
    measure_gap,
    mixture_next_token,
    posterior_weights,
    prior_weights,
    time_independent_weights,
    top1,
    uniform_weights,
)
from ensemble.theory import main, make_dataset

TOKENS = st.integers(min_value=0, max_value=3)
SEQUENCES = st.lists(st.lists(TOKENS, max_size=4).map(tuple), min_size=1, max_size=12)


@st.composite
def partitioned_datasets(draw: st.DrawFn) -> tuple[list[tuple[int, ...]], list[int], int]:
    sequences = draw(SEQUENCES)
    # Empty clusters are allowed on purpose: they must get weight zero, never a crash.
    num_clusters = draw(st.integers(min_value=1, max_value=4))
    cluster_ids = draw(
        st.lists(st.integers(0, num_clusters - 1), min_size=len(sequences), max_size=len(sequences))
    )
    return sequences, cluster_ids, num_clusters


def _prefixes_to_check(
    sequences: list[tuple[int, ...]], extra: list[tuple[int, ...]]
) -> set[tuple[int, ...]]:
    # Every prefix of the data (seen in some clusters, unseen in others), plus random ones
    # that may be unseen everywhere, plus a token that is not in the vocabulary at all.
    seen = {s[:end] for s in sequences for end in range(len(s) + 1)}
    return seen | set(extra) | {(99,)}


@settings(max_examples=150, deadline=None)
@given(partitioned_datasets(), st.lists(st.lists(TOKENS, max_size=5).map(tuple), max_size=6))
def test_posterior_routed_mixture_equals_the_centralised_model(
    dataset: tuple[list[tuple[int, ...]], list[int], int], extra: list[tuple[int, ...]]
) -> None:
    sequences, cluster_ids, num_clusters = dataset
    centralised, experts = fit_partition(sequences, cluster_ids, num_clusters)
    for prefix in _prefixes_to_check(sequences, extra):
        weights = posterior_weights(experts, prefix)
        assert sum(weights) == 1
        mixture = mixture_next_token(experts, weights, prefix)
        assert mixture == centralised.next_token_distribution(prefix), prefix
        assert sum(mixture.values()) == 1


@settings(max_examples=100, deadline=None)
@given(partitioned_datasets())
def test_posterior_is_the_share_of_matching_sequences_per_cluster(
    dataset: tuple[list[tuple[int, ...]], list[int], int],
) -> None:
    # The derivation in docs/theory.md: p(S_k) prod_t p_k(z_t | z_<t) = n_k(z) / N, so the
    # posterior is n_k(z) / n(z), Bayes over disjoint clusters.
    sequences, cluster_ids, num_clusters = dataset
    centralised, experts = fit_partition(sequences, cluster_ids, num_clusters)
    for sequence in sequences:
        for end in range(len(sequence) + 1):
            prefix = sequence[:end]
            expected = [
                Fraction(e.prefix_counts.get(prefix, 0), centralised.prefix_counts[prefix])
                for e in experts
            ]
            assert posterior_weights(experts, prefix) == expected


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_time_independent_and_top1_are_exact_when_the_image_fixes_the_cluster(
    data: st.DataObject,
) -> None:
    # The paper partitions by image: then p(S_k | c) is one-hot and freezing it loses nothing.
    sequences = data.draw(st.lists(st.lists(TOKENS, min_size=1, max_size=4).map(tuple), min_size=1))
    num_clusters = data.draw(st.integers(1, 3))
    cluster_of_image = data.draw(st.lists(st.integers(0, num_clusters - 1), min_size=4, max_size=4))
    cluster_ids = [cluster_of_image[s[0]] for s in sequences]
    centralised, experts = fit_partition(sequences, cluster_ids, num_clusters)
    for router in (time_independent_weights, top1(time_independent_weights)):
        for sequence in sequences:
            for end in range(1, len(sequence) + 1):
                prefix = sequence[:end]
                mixture = mixture_next_token(experts, router(experts, prefix), prefix)
                assert mixture == centralised.next_token_distribution(prefix)


def test_time_independent_router_is_not_exact_when_clusters_share_an_image() -> None:
    # Image 0 appears in both clusters with different texts. After seeing text token 5 only
    # cluster 0 is possible, but the frozen router still gives cluster 1 half the weight.
    sequences = [(0, 5, 5), (0, 6, 6)]
    centralised, experts = fit_partition(sequences, [0, 1], num_clusters=2)
    prefix = (0, 5)
    assert time_independent_weights(experts, prefix) == [Fraction(1, 2), Fraction(1, 2)]
    assert posterior_weights(experts, prefix) == [Fraction(1), Fraction(0)]
    mixture = mixture_next_token(experts, time_independent_weights(experts, prefix), prefix)
    # Expert 1 never saw (0, 5): it falls back to uniform over {0, 5, 6, END}.
    assert mixture[5] == Fraction(1, 2) + Fraction(1, 2) * Fraction(1, 4)
    assert centralised.next_token_probability(prefix, 5) == 1

    exact = measure_gap(sequences, centralised, experts, posterior_weights)
    assert exact.kl_per_token == 0 and exact.total_variation == 0
    frozen = measure_gap(sequences, centralised, experts, time_independent_weights)
    assert 0 < frozen.kl_per_token < math.inf
    assert frozen.zero_probability_mass == 0
    hard = measure_gap(sequences, centralised, experts, top1(time_independent_weights))
    # Top-1 sends image 0 to cluster 0, which gives (0, 6, 6) probability zero.
    assert hard.kl_per_token == math.inf
    assert hard.zero_probability_mass == pytest.approx(0.5)


def test_frozen_router_kl_matches_a_hand_computation() -> None:
    sequences = [(0, 5, 5), (0, 6, 6)]
    centralised, experts = fit_partition(sequences, [0, 1], num_clusters=2)
    report = measure_gap(sequences, centralised, experts, time_independent_weights)
    # Q(5, 5, END | 0): step 1 = 1/2; step 2 = 1/2 * 1 + 1/2 * 1/4 = 5/8; step 3 the same.
    # P(5, 5, END | 0) = 1/2. Symmetric for (6, 6). Three predicted tokens per sequence.
    q = Fraction(1, 2) * Fraction(5, 8) ** 2
    expected = math.log(Fraction(1, 2) / q) / 3
    assert report.kl_per_token == pytest.approx(expected, abs=1e-12)


def test_unseen_prefix_is_uniform_and_finished_prefix_is_refused() -> None:
    model = TabularModel.fit([(1, 2)], vocabulary={1, 2})
    assert model.next_token_distribution((2,)) == {
        1: Fraction(1, 3),
        2: Fraction(1, 3),
        END_OF_SEQUENCE: Fraction(1, 3),
    }
    assert model.next_token_probability((1, 2), END_OF_SEQUENCE) == 1
    with pytest.raises(ValueError, match="past END_OF_SEQUENCE"):
        model.next_token_probability((1, 2, END_OF_SEQUENCE), 1)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="one cluster id per sequence"):
        fit_partition([(1,), (2,)], [0], num_clusters=1)
    with pytest.raises(ValueError, match="cluster id 3 out of range"):
        fit_partition([(1,)], [3], num_clusters=2)
    with pytest.raises(ValueError, match="token -2"):
        TabularModel.fit([(1, -2)], vocabulary={1, -2})
    with pytest.raises(ValueError, match="all clusters are empty"):
        prior_weights([TabularModel.fit([], vocabulary={1})])


def test_routers_weights_sum_to_one() -> None:
    sequences = [(0, 5), (1, 6), (1, 5), (2, 5, 6)]
    _, experts = fit_partition(sequences, [0, 1, 2, 1], num_clusters=3)
    for router in (posterior_weights, time_independent_weights, uniform_weights):
        for prefix in [(), (1,), (1, 5), (7, 7)]:
            assert sum(router(experts, prefix)) == 1
            assert sum(top1(router)(experts, prefix)) == 1


def test_separable_synthetic_dataset_has_no_gap_and_overlap_has_one() -> None:
    small = {"num_sequences": 300, "num_clusters": 3, "num_images": 6}
    separable = make_dataset("separable", image_overlap=0.0, **small)
    overlapping = make_dataset("overlap", image_overlap=0.6, **small)
    for dataset, gap_expected in ((separable, False), (overlapping, True)):
        centralised, experts = fit_partition(
            dataset.sequences, dataset.cluster_ids, dataset.num_clusters
        )
        exact = measure_gap(dataset.sequences, centralised, experts, posterior_weights)
        assert exact.kl_per_token == 0 and exact.total_variation == pytest.approx(0, abs=1e-12)
        frozen = measure_gap(dataset.sequences, centralised, experts, time_independent_weights)
        assert (frozen.kl_per_token > 1e-3) is gap_expected


def test_make_dataset_is_deterministic_for_a_seed() -> None:
    first = make_dataset("a", image_overlap=0.3, text_only_share=0.2, num_sequences=50, seed=7)
    again = make_dataset("a", image_overlap=0.3, text_only_share=0.2, num_sequences=50, seed=7)
    assert first == again
    assert len(first.sequences) == len(first.cluster_ids) == 50


def test_cli_prints_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ensemble.theory as theory

    monkeypatch.setattr(theory, "GAP_DATASETS", (("tiny", 0.5, 0.1),))
    original = theory.make_dataset
    monkeypatch.setattr(
        theory,
        "make_dataset",
        lambda name, **kw: original(name, **{**kw, "num_sequences": 60, "num_images": 4}),
    )
    assert main(["--json"]) == 0
    out = capsys.readouterr().out
    assert '"router": "posterior (exact)"' in out
    assert main([]) == 0
    assert "| tiny |" in capsys.readouterr().out
