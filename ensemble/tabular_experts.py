"""Tabular next-token experts, the routers that mix them, and what a router's mixture costs.

Split a dataset of token sequences into disjoint clusters S_1..S_K and fit one *tabular*
expert per cluster: ``p_k(x | z)`` is a ratio of exact counts of prefixes in S_k. Fit the
centralised model the same way on all the data. Then the posterior-routed mixture

    p(x | z) = sum_k p(S_k | z) p_k(x | z),   p(S_k | z) ∝ p(S_k) prod_t p_k(z_t | z_<t)

equals the centralised model exactly, for every prefix (``docs/theory.md`` has the three-line
proof). The routers a real ensemble can afford are approximations of that posterior: the
paper's time-independent router sees only the conditioning token (the "image", position 0)
and freezes ``p(S_k | c)``; top-1 keeps only the argmax cluster. ``measure_gap`` says what
each approximation costs, in nats per token against the centralised model.

Example::

    >>> data = [(0, 5, 6), (0, 5, 7), (1, 6, 6)]
    >>> centralised, experts = fit_partition(data, cluster_ids=[0, 1, 1], num_clusters=2)
    >>> prefix = (0, 5)
    >>> weights = posterior_weights(experts, prefix)
    >>> mixture_next_token(experts, weights, prefix) == centralised.next_token_distribution(prefix)
    True

Conventions (why they are harmless is in docs/theory.md):

* Every sequence ends with ``END_OF_SEQUENCE`` (appended by ``fit``), so the models also say
  when a sequence stops. Tokens are non-negative integers.
* A prefix a model never saw gets the uniform distribution over the shared vocabulary (all
  tokens of the whole dataset, plus ``END_OF_SEQUENCE``).
* When no cluster saw a prefix, the posterior falls back to the prior ``p(S_k)``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

__all__ = [
    "END_OF_SEQUENCE",
    "GapReport",
    "Router",
    "TabularModel",
    "exact_log",
    "fit_partition",
    "measure_gap",
    "mixture_next_token",
    "posterior_weights",
    "prior_weights",
    "time_independent_weights",
    "top1",
    "uniform_weights",
]

END_OF_SEQUENCE: Final = -1

Prefix = tuple[int, ...]
# A router maps (experts, prefix) to one weight per expert; the weights sum to one.
Router = Callable[[Sequence["TabularModel"], Prefix], list[Fraction]]


@dataclass(frozen=True)
class TabularModel:
    """A next-token model that is nothing but exact prefix counts.

    Attributes:
        prefix_counts: For every prefix of every training sequence (``END_OF_SEQUENCE``
            included), how many training sequences start with it. ``()`` maps to the number
            of sequences.
        vocabulary: The tokens a next-token distribution ranges over, ``END_OF_SEQUENCE``
            included. Experts and the centralised model must share it, so that the uniform
            fallback for unseen prefixes is the same distribution everywhere.
    """

    prefix_counts: Mapping[Prefix, int]
    vocabulary: frozenset[int]

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], vocabulary: Iterable[int]) -> TabularModel:
        """Counts every prefix of ``sequences`` (each with ``END_OF_SEQUENCE`` appended).

        Args:
            sequences: Token sequences; tokens are non-negative integers.
            vocabulary: Tokens the model predicts over; ``END_OF_SEQUENCE`` is added.

        Raises:
            ValueError: A token is negative or not in ``vocabulary``.
        """
        vocab = frozenset(vocabulary) | {END_OF_SEQUENCE}
        counts: Counter[Prefix] = Counter()
        for sequence in sequences:
            full = (*sequence, END_OF_SEQUENCE)
            for token in sequence:
                if token < 0 or token not in vocab:
                    raise ValueError(
                        f"token {token} in sequence {tuple(sequence)}: expected a "
                        f"non-negative token of the vocabulary {sorted(vocab - {END_OF_SEQUENCE})}"
                    )
            for end in range(len(full) + 1):
                counts[full[:end]] += 1
        return cls(prefix_counts=dict(counts), vocabulary=vocab)

    @property
    def num_sequences(self) -> int:
        """How many sequences the model was fitted on."""
        return self.prefix_counts.get((), 0)

    def next_token_probability(self, prefix: Prefix, token: int) -> Fraction:
        """``p(token | prefix)``: count(prefix + token) / count(prefix), uniform if unseen.

        Raises:
            ValueError: ``prefix`` already contains ``END_OF_SEQUENCE``.
        """
        _check_prefix(prefix)
        if token not in self.vocabulary:
            return Fraction(0)
        context = self.prefix_counts.get(prefix, 0)
        if context == 0:
            return Fraction(1, len(self.vocabulary))
        return Fraction(self.prefix_counts.get((*prefix, token), 0), context)

    def next_token_distribution(self, prefix: Prefix) -> dict[int, Fraction]:
        """``p(. | prefix)`` over the whole vocabulary (zeros included)."""
        return {token: self.next_token_probability(prefix, token) for token in self.vocabulary}

    def sequence_probability(self, prefix: Prefix) -> Fraction:
        """``prod_t p(z_t | z_<t)`` over ``prefix``; equals count(prefix) / N where seen."""
        probability = Fraction(1)
        for t, token in enumerate(prefix):
            if probability == 0:
                break
            probability *= self.next_token_probability(prefix[:t], token)
        return probability


def _check_prefix(prefix: Prefix) -> None:
    if END_OF_SEQUENCE in prefix:
        raise ValueError(
            f"prefix {prefix} continues past END_OF_SEQUENCE ({END_OF_SEQUENCE}); "
            "a finished sequence has no next token"
        )


def fit_partition(
    sequences: Sequence[Sequence[int]], cluster_ids: Sequence[int], num_clusters: int
) -> tuple[TabularModel, list[TabularModel]]:
    """Fits the centralised model on all data and one expert per cluster.

    Args:
        sequences: The dataset.
        cluster_ids: ``cluster_ids[i]`` is the cluster of ``sequences[i]``, in
            ``range(num_clusters)``. Clusters may be empty.
        num_clusters: K.

    Returns:
        ``(centralised, experts)``, all over the same vocabulary.

    Raises:
        ValueError: Lengths differ or a cluster id is out of range.
    """
    if len(sequences) != len(cluster_ids):
        raise ValueError(
            f"expected one cluster id per sequence: {len(sequences)} sequences, "
            f"{len(cluster_ids)} cluster ids"
        )
    bad = [k for k in cluster_ids if not 0 <= k < num_clusters]
    if bad:
        raise ValueError(f"cluster id {bad[0]} out of range: expected 0..{num_clusters - 1}")
    vocabulary = {token for sequence in sequences for token in sequence}
    centralised = TabularModel.fit(sequences, vocabulary)
    experts = [
        TabularModel.fit(
            [s for s, k in zip(sequences, cluster_ids, strict=True) if k == cluster], vocabulary
        )
        for cluster in range(num_clusters)
    ]
    return centralised, experts


# --- routers -----------------------------------------------------------------------------


def prior_weights(experts: Sequence[TabularModel]) -> list[Fraction]:
    """``p(S_k) = |S_k| / N``."""
    total = sum(expert.num_sequences for expert in experts)
    if total == 0:
        raise ValueError("all clusters are empty: there is nothing to route to")
    return [Fraction(expert.num_sequences, total) for expert in experts]


def posterior_weights(experts: Sequence[TabularModel], prefix: Prefix) -> list[Fraction]:
    """The exact router: ``p(S_k | z) ∝ p(S_k) prod_t p_k(z_t | z_<t)``.

    Each factor is what expert k itself says about the prefix, so the router needs no data:
    in a deployed ensemble it is updated token by token from the experts' own log-probs.
    Falls back to the prior when no cluster saw the prefix (every term is zero).
    """
    _check_prefix(prefix)
    prior = prior_weights(experts)
    joint = [
        p * expert.sequence_probability(prefix) for p, expert in zip(prior, experts, strict=True)
    ]
    total = sum(joint, Fraction(0))
    if total == 0:
        return prior
    return [w / total for w in joint]


def time_independent_weights(
    experts: Sequence[TabularModel], prefix: Prefix, conditioning_length: int = 1
) -> list[Fraction]:
    """The paper's router: ``p(S_k | c)`` from the conditioning tokens only, then frozen.

    ``c = prefix[:conditioning_length]`` plays the image. The weights are the exact cluster
    posterior given c (the paper's ``softmax(tau * cos(f(image), c_k))`` is an estimate of it),
    and do not move as text is generated.
    """
    return posterior_weights(experts, prefix[:conditioning_length])


def uniform_weights(experts: Sequence[TabularModel], prefix: Prefix) -> list[Fraction]:
    """``1 / K`` for every expert, whatever the prefix (DESIGN §7's `uniform` strategy)."""
    return [Fraction(1, len(experts))] * len(experts)


def top1(router: Router) -> Router:
    """Keeps only the argmax cluster of ``router`` (ties: the lowest index), weight one."""

    def routed(experts: Sequence[TabularModel], prefix: Prefix) -> list[Fraction]:
        weights = router(experts, prefix)
        best = max(range(len(weights)), key=lambda k: (weights[k], -k))
        return [Fraction(int(k == best)) for k in range(len(weights))]

    return routed


def _mixture_probability(
    experts: Sequence[TabularModel], weights: Sequence[Fraction], prefix: Prefix, token: int
) -> Fraction:
    # Zero-weight experts are skipped: top-1 then costs one expert, as in the runtime.
    return sum(
        (
            w * e.next_token_probability(prefix, token)
            for w, e in zip(weights, experts, strict=True)
            if w
        ),
        Fraction(0),
    )


def mixture_next_token(
    experts: Sequence[TabularModel], weights: Sequence[Fraction], prefix: Prefix
) -> dict[int, Fraction]:
    """``sum_k w_k p_k(. | prefix)`` over the shared vocabulary."""
    return {
        token: _mixture_probability(experts, weights, prefix, token)
        for token in experts[0].vocabulary
    }


# --- measuring the gap -------------------------------------------------------------------


@dataclass(frozen=True)
class GapReport:
    """How far a routed mixture is from the centralised model, given the conditioning token.

    All three are expectations over the data (c and the text continuing it):

    Attributes:
        kl_per_token: ``KL(centralised || mixture)`` of the continuation given c, in nats,
            divided by the mean number of predicted tokens (``END_OF_SEQUENCE`` included).
            ``inf`` when the mixture gives a training sequence probability zero.
        total_variation: Mean over c of the total variation distance between the two
            distributions of continuations.
        zero_probability_mass: Share of the data the mixture gives probability zero.
    """

    kl_per_token: float
    total_variation: float
    zero_probability_mass: float


def exact_log(value: Fraction) -> float:
    """``log(value)`` of a probability however small (no float underflow)."""
    # Through numerator and denominator so that tiny probabilities do not underflow a float.
    return math.log(value.numerator) - math.log(value.denominator)


def measure_gap(
    sequences: Sequence[Sequence[int]],
    centralised: TabularModel,
    experts: Sequence[TabularModel],
    router: Router,
    conditioning_length: int = 1,
) -> GapReport:
    """Compares ``router``'s mixture with the centralised model on the training data.

    Tokens before ``conditioning_length`` are given (the image), not predicted: the gap is
    that of the text distribution given the image, as a VLM is evaluated.
    """
    data = Counter((*s, END_OF_SEQUENCE) for s in sequences)
    total = sum(data.values())
    kl = 0.0
    zero_mass = 0.0
    predicted_tokens = 0.0
    # Per conditioning value: sum over its sequences of |P - Q|, and of Q.
    abs_diff: defaultdict[Prefix, Fraction] = defaultdict(Fraction)
    q_on_support: defaultdict[Prefix, Fraction] = defaultdict(Fraction)
    weight_cache: dict[Prefix, list[Fraction]] = {}
    for sequence, count in data.items():
        condition = sequence[:conditioning_length]
        p_data = Fraction(count, total)
        p_text = Fraction(count, centralised.prefix_counts[condition])
        q_text = Fraction(1)
        for t in range(conditioning_length, len(sequence)):
            prefix = sequence[:t]
            if prefix not in weight_cache:
                weight_cache[prefix] = router(experts, prefix)
            weights = weight_cache[prefix]
            q_text *= _mixture_probability(experts, weights, prefix, sequence[t])
            if q_text == 0:
                break
        predicted_tokens += float(p_data) * (len(sequence) - conditioning_length)
        if q_text == 0:
            kl = math.inf
            zero_mass += float(p_data)
        elif kl != math.inf:
            kl += float(p_data) * (exact_log(p_text) - exact_log(q_text))
        abs_diff[condition] += abs(p_text - q_text)
        q_on_support[condition] += q_text
    total_variation = 0.0
    for condition, q_mass in q_on_support.items():
        # Q's mass off the data's support counts fully: P is zero there.
        tv = (abs_diff[condition] + 1 - q_mass) / 2
        total_variation += float(tv * Fraction(centralised.prefix_counts[condition], total))
    return GapReport(
        kl_per_token=kl / predicted_tokens if predicted_tokens else 0.0,
        total_variation=total_variation,
        zero_probability_mass=zero_mass,
    )
