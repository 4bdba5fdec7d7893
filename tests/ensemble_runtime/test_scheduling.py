"""Many samples at once, at most ``batch_size`` rows per model call: each expert's samples
fill calls of their own, so a call reads one expert's weights, as a dense batch does; the
answers are the ones every sample gets in one call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ensemble.runtime import RoutedEnsemble
from ensemble.scheduling import batches, slices
from protocol.errors import InvalidArgument

from .builders import picture

PROMPT = "What is in the picture?"


def test_each_experts_samples_fill_calls_of_their_own() -> None:
    experts = [0, 1, 0, 0, 1, 0, 0]
    calls = batches([(e,) for e in experts], 2)
    # Expert 0's five samples: two whole calls, one left over; expert 1's two: one call.
    assert calls == [[0, 2], [3, 5], [1, 4], [6]]
    assert batches([(e,) for e in experts], None) == [[0, 2, 3, 5, 6, 1, 4]]
    assert batches([], 4) == [] and batches([], None) == []


def test_slices_of_at_most_a_batch() -> None:
    assert slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert slices(5, None) == [slice(0, 5)] and slices(0, None) == [] and slices(0, 3) == []


def test_remainders_share_calls_largest_first() -> None:
    routes = [(0,), (1,), (0,), (1,), (2,), (0,), (1,)]
    # Three of expert 0, three of expert 1, one of expert 2, four rows a call: no whole calls;
    # expert 2's sample joins the first call with room.
    assert batches(routes, 4) == [[0, 2, 5, 4], [1, 3, 6]]
    assert batches(routes, 7) == [[0, 2, 5, 1, 3, 6, 4]]
    # One sample each of experts 0 and 1, three each of 2 and 3: largest first, two calls
    # of four rows; in route order, three calls (0 and 1 together, then 2, then 3).
    routes = [(2,), (0,), (3,), (2,), (1,), (3,), (2,), (3,)]
    assert batches(routes, 4) == [[1, 0, 3, 6], [4, 2, 5, 7]]


def test_a_mixture_takes_a_row_per_expert() -> None:
    routes = [(0, 1)] * 5 + [(0, 2)]
    calls = batches(routes, 4)
    assert calls == [[0, 1], [2, 3], [4, 5]]  # two samples (four rows) a call
    assert batches([(0, 1, 2)], 2) == [[0]]  # wider than a call: alone
    with pytest.raises(ValueError, match="batch_size: expected >= 1, got 0"):
        batches(routes, 0)


@given(
    routes=st.lists(
        st.lists(st.integers(0, 4), min_size=1, max_size=3, unique=True).map(
            lambda r: tuple(sorted(r))
        ),
        max_size=40,
    ),
    batch_size=st.integers(1, 9),
)
def test_calls_cover_every_sample_once_and_stay_within_the_batch(
    routes: list[tuple[int, ...]], batch_size: int
) -> None:
    calls = batches(routes, batch_size)
    assert sorted(i for call in calls for i in call) == list(range(len(routes)))
    for call in calls:
        rows = sum(len(routes[i]) for i in call)
        assert rows <= batch_size or len(call) == 1
        assert call == sorted(call, key=lambda i: (routes[i], i))
    # Calls that mix routes hold only remainders: at most one per route, and never a call's
    # worth of any one route.
    mixed = [call for call in calls if len({routes[i] for i in call}) > 1]
    assert len(mixed) <= len(set(routes))
    for call in mixed:
        for route in {routes[i] for i in call}:
            per_call = max(1, batch_size // len(route))
            assert sum(routes[i] == route for i in call) < per_call
    remainders = sum(1 for r in set(routes) if routes.count(r) % max(1, batch_size // len(r)))
    whole = sum(routes.count(r) // max(1, batch_size // len(r)) for r in set(routes))
    assert len(calls) <= whole + remainders


@contextmanager
def rows_per_call(models: list[nn.Module]) -> Iterator[list[list[int]]]:
    """The rows of each forward call of each model."""
    rows: list[list[int]] = [[] for _ in models]
    handles = []
    for position, model in enumerate(models):

        def hook(_: nn.Module, args: Any, kwargs: Any, position: int = position) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            rows[position].append(int(ids.shape[0]))

        handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


def _images() -> list[Any]:
    reds = [picture("red-square", v) for v in range(4)]
    blues = [picture("blue-circle", v) for v in range(2)]
    return [reds[0], blues[0], reds[1], reds[2], blues[1], reds[3]]


def _scheduled(
    ensemble: RoutedEnsemble, images: list[Any], batch_size: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Top-1 experts and, per model call, its rows: ``[stacked, expert 0, expert 1]``; the
    answers must be the ones every sample gets in one call."""
    stacked = ensemble.experts.stacked
    assert stacked is not None
    prompts = [PROMPT] * len(images)
    together = ensemble.generate_tokens(images, prompts, max_new_tokens=6)
    own = [ensemble.experts.model(0), ensemble.experts.model(1)]
    with rows_per_call([stacked.model, *own]) as rows:
        scheduled = ensemble.generate_tokens(
            images, prompts, max_new_tokens=6, batch_size=batch_size
        )
    assert scheduled.token_ids == together.token_ids
    assert scheduled.experts == together.experts
    return scheduled.experts, rows


def test_top1_calls_read_one_experts_weights(ensemble: RoutedEnsemble) -> None:
    experts, rows = _scheduled(ensemble, _images(), 2)
    assert experts == [[0], [1], [0], [0], [1], [0]]
    # Four red, two blue, two rows a call: every call is one expert's, none stacked.
    assert rows[0] == []
    assert rows[1] and rows[2] and max(rows[1] + rows[2]) <= 2
    assert rows[1][0] == 2 and rows[2][0] == 2  # both red prefills and the blue one are full


def test_leftovers_of_two_experts_share_one_call(ensemble: RoutedEnsemble) -> None:
    images = _images()[:5]  # three red, two blue
    # Two rows a call: red fills one and leaves one over, blue fills one; red's left over
    # has nothing to share with.
    _, rows = _scheduled(ensemble, images, 2)
    assert rows[0] == [] and rows[1][0] == 2 and rows[2][0] == 2
    # Four: neither fills a call, and together they do not fit one: a call each.
    _, rows = _scheduled(ensemble, images, 4)
    assert rows[0] == [] and rows[1][0] == 3 and rows[2][0] == 2
    # Five: both fit one stacked call.
    _, rows = _scheduled(ensemble, images, 5)
    assert rows[0][0] == 5 and rows[1:] == [[], []]


@pytest.mark.parametrize(("top_k", "text_only"), [(2, "posterior"), (1, "posterior")])
def test_mixtures_and_posterior_keep_their_answers(
    ensemble: RoutedEnsemble, top_k: int, text_only: str
) -> None:
    images = [picture("red-square", 1), None, picture("blue-circle", 2), None]
    prompts = [PROMPT, "Tell me about shapes.", "Describe it.", "Name a colour."]
    together = ensemble.generate_tokens(
        images, prompts, max_new_tokens=5, top_k=top_k, text_only=text_only
    )
    stacked = ensemble.experts.stacked
    assert stacked is not None
    with rows_per_call([stacked.model]) as rows:
        scheduled = ensemble.generate_tokens(
            images, prompts, max_new_tokens=5, top_k=top_k, text_only=text_only, batch_size=2
        )
    assert scheduled.token_ids == together.token_ids
    for a, b in zip(scheduled.posteriors, together.posteriors, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            torch.testing.assert_close(a, b)
    # A posterior sample runs through both experts: two rows, so one sample a call.
    assert rows[0] and max(rows[0]) <= 2


def test_seeded_sampling_is_reproducible_across_calls(ensemble: RoutedEnsemble) -> None:
    images = _images()
    prompts = [PROMPT] * len(images)

    def sample(seed: int) -> list[list[int]]:
        return ensemble.generate_tokens(
            images, prompts, 6, top_k=2, do_sample=True, seed=seed, batch_size=2
        ).token_ids

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_bad_batch_size(ensemble: RoutedEnsemble) -> None:
    with pytest.raises(InvalidArgument, match="batch_size: expected >= 1, got 0"):
        ensemble.generate([picture("red-square")], [PROMPT], 2, batch_size=0)
