"""One model call per decoding step: full experts of one architecture run stacked (each row
through its own expert's weights), LoRA adapters per row; the answers are the ones the
experts give when each runs on its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from ensemble.runtime import RoutedEnsemble

from .builders import picture

PROMPT = "What is in the picture?"


@contextmanager
def counting_forwards(models: list[nn.Module]) -> Iterator[list[int]]:
    """Counts the forward calls of each model (as it was called: generate calls forward)."""
    counts = [0] * len(models)
    handles = []
    for position, model in enumerate(models):

        def hook(*_: object, position: int = position) -> None:
            counts[position] += 1

        handles.append(model.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _per_expert_calls(ensemble: RoutedEnsemble) -> Iterator[None]:
    """The ensemble as it runs experts that cannot be stacked: one call per expert."""
    stacked, ensemble.experts.stacked = ensemble.experts.stacked, None
    try:
        yield
    finally:
        ensemble.experts.stacked = stacked


def test_full_experts_stack_by_their_differing_weights(ensemble: RoutedEnsemble) -> None:
    stacked = ensemble.experts.stacked
    assert stacked is not None and stacked.experts == {0, 1}
    # The experts were initialised apart, so every weighted submodule differs; a module is
    # replaced once (its submodules are not listed again).
    assert "model.language_model.layers.0.self_attn.q_proj" in stacked.differing
    assert "lm_head" in stacked.differing
    assert not any(a.startswith(b + ".") for a in stacked.differing for b in stacked.differing)
    # Nothing is copied: the stacked model's weights are the experts' own tensors.
    own = {p.data_ptr() for k in (0, 1) for p in ensemble.experts.model(k).parameters()}
    assert {p.data_ptr() for p in stacked.model.parameters()} <= own


def test_a_routed_batch_is_one_model_call_per_step(ensemble: RoutedEnsemble) -> None:
    stacked = ensemble.experts.stacked
    assert stacked is not None
    own = [ensemble.experts.model(0), ensemble.experts.model(1)]
    images = [picture("red-square", 1), picture("blue-circle", 2), picture("red-square", 2)]
    with counting_forwards([stacked.model, *own]) as counts:
        result = ensemble.generate_tokens(images, [PROMPT] * 3, max_new_tokens=4)
    assert result.experts == [[0], [1], [0]]
    assert counts[1:] == [0, 0]  # no expert ran on its own
    assert 1 <= counts[0] <= 4  # one prefill, then one call per new token
    with counting_forwards([stacked.model, *own]) as counts:
        ensemble.generate_tokens(images, [PROMPT] * 3, max_new_tokens=4, top_k=2)
    assert counts[1:] == [0, 0] and 1 <= counts[0] <= 4
    with _per_expert_calls(ensemble), counting_forwards(own) as counts:
        ensemble.generate_tokens(images, [PROMPT] * 3, max_new_tokens=4)
    assert counts[0] >= 1 and counts[1] >= 1


@pytest.mark.parametrize(
    ("top_k", "text_only"), [(1, "posterior"), (2, "posterior"), (2, "uniform")]
)
def test_stacked_and_per_expert_calls_agree(
    ensemble: RoutedEnsemble, top_k: int, text_only: str
) -> None:
    images = [picture("blue-circle", 1), None, picture("red-square", 2), picture("red-square", 3)]
    prompts = [PROMPT, "Tell me about shapes.", "Describe it.", PROMPT]

    def run() -> tuple[list[list[int]], list[torch.Tensor | None]]:
        result = ensemble.generate_tokens(
            images, prompts, max_new_tokens=5, top_k=top_k, text_only=text_only
        )
        return result.token_ids, result.posteriors

    stacked_ids, stacked_posteriors = run()
    with _per_expert_calls(ensemble):
        own_ids, own_posteriors = run()
    assert stacked_ids == own_ids
    for a, b in zip(stacked_posteriors, own_posteriors, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            torch.testing.assert_close(a, b)


def test_rows_of_one_expert_must_be_adjacent(ensemble: RoutedEnsemble) -> None:
    with pytest.raises(ValueError, match="grouped by expert"):
        ensemble.experts.units([0, 1, 0], [True, True, True])


def test_block_layout_pads_unequal_runs_and_gives_up_on_lopsided_ones() -> None:
    from ensemble.stacked_experts import BlockLayout

    equal = BlockLayout.of([(0, 0, 2), (1, 2, 4)], [0, 1])
    assert equal is not None and equal.pad is None and equal.unpad is None
    padded = BlockLayout.of([(0, 0, 2), (1, 2, 3)], [0, 1])
    assert padded is not None and padded.pad is not None and padded.unpad is not None
    assert padded.pad.tolist() == [0, 1, 2, 2] and padded.unpad.tolist() == [0, 1, 2]
    assert BlockLayout.of([(0, 0, 5), (1, 5, 6)], [0, 1]) is None  # 10 rows for 6
    assert BlockLayout.of([(1, 0, 2)], [0, 1]) is None  # expert 0 has no rows
    weights = torch.randn(2, 3, 4)
    bias = torch.randn(2, 1, 4)
    x = torch.randn(3, 5, 3)
    expected = torch.cat([x[:2] @ weights[0] + bias[0], x[2:] @ weights[1] + bias[1]])
    torch.testing.assert_close(padded.linear(x, weights, bias), expected)
