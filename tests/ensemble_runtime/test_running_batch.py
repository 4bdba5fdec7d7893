"""Continuous batching: prompts that join a running top-1 batch between decoding steps, and
leave it when done, get exactly the tokens ``generate`` gives each of them alone -- for
stacked full experts, LoRA adapters (per row, and one call per adapter beside a projector
trained in full) and a router sharing the experts' CLIP tower."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ensemble.running_batch import Joining, RunningBatch, runs_here
from ensemble.runtime import RoutedEnsemble

from .builders import build_ensemble, picture

PROMPTS = [
    (("red-square", 1), "What is in the picture?", Joining(None, "")),
    (("blue-circle", 2), "Describe it.", Joining(None, "")),
    (("red-square", 2), "What is it?", Joining(None, "", True, 0.8, 0.9, 7)),
    (("blue-circle", 3), "What is it?", Joining(None, "", True, 1.0, 1.0, 8)),
    (("blue-circle", 1), "What colour?", Joining(None, "")),
    (("red-square", 3), "Describe it.", Joining(None, "", True, 1.3, 1.0, None)),
]
TOKENS = 10


def _joining(i: int) -> Joining:
    (kind, variant), prompt, settings = PROMPTS[i]
    return Joining(
        picture(kind, variant),
        prompt,
        settings.do_sample,
        settings.temperature,
        settings.top_p,
        settings.seed,
    )


def _alone(ensemble: RoutedEnsemble, i: int) -> list[int]:
    joining = _joining(i)
    result = ensemble.generate_tokens(
        [joining.image],
        [joining.prompt],
        TOKENS,
        do_sample=joining.do_sample,
        temperature=joining.temperature,
        top_p=joining.top_p,
        seed=joining.seed,
    )
    return result.token_ids[0]


def _decode(batch: RunningBatch, steps: int, tokens: dict[int, list[int]]) -> None:
    eos = batch.ensemble.tokenizer.eos_token_id
    for _ in range(steps):
        if not batch.rows:
            return
        chosen = batch.choose()
        leaving = []
        for row, token in zip(batch.rows, chosen, strict=True):
            if token is None:
                continue
            if token == eos:
                leaving.append(row)
                continue
            tokens.setdefault(row.handle, []).append(token)
            if len(tokens[row.handle]) == TOKENS:
                leaving.append(row)
        batch.leave(leaving)
        batch.step(chosen)


def _staggered(ensemble: RoutedEnsemble) -> tuple[dict[int, list[int]], list[int]]:
    """Joins in three waves a few steps apart; returns each prompt's tokens and the rows
    decoding when each wave joined."""
    batch = RunningBatch(ensemble)
    tokens: dict[int, list[int]] = {}
    live = []
    with torch.inference_mode():
        for wave, steps in (([0, 1], 3), ([2], 4), ([3, 4, 5], 2 * TOKENS)):
            live.append(batch.live)
            rows = batch.join(wave, [_joining(i) for i in wave])
            assert [row.handle for row in rows] == wave
            _decode(batch, steps, tokens)
    assert not batch.rows
    return tokens, live


def test_joining_rows_answer_as_generate_alone(ensemble: RoutedEnsemble) -> None:
    tokens, live = _staggered(ensemble)
    assert live == [0, 2, 3]  # each later wave joined rows that were decoding
    for i in range(len(PROMPTS)):
        if PROMPTS[i][2].seed is None and PROMPTS[i][2].do_sample:
            assert len(tokens[i]) <= TOKENS  # unseeded: any sample
            continue
        assert tokens[i] == _alone(ensemble, i), i
    # The prompts differ, so equal answers mean something.
    assert len({tuple(tokens[i]) for i in range(len(PROMPTS))}) == len(PROMPTS)


@pytest.fixture(scope="module", params=["lora", "lora-projector", "shared-tower"])
def variant(request: Any, tmp_path_factory: pytest.TempPathFactory) -> RoutedEnsemble:
    root = tmp_path_factory.mktemp(request.param)
    options = {
        "lora": {"lora": True},
        "lora-projector": {"lora": True, "lora_projector": True},
        "shared-tower": {"shared_encoder": True},
    }[request.param]
    directory: Path = build_ensemble(root / "ensemble", scratch=root / "pictures", **options)
    return RoutedEnsemble.from_pretrained(directory, verify=False, device="cpu")


@pytest.mark.slow
def test_joining_rows_answer_as_alone_for_every_kind_of_expert(variant: RoutedEnsemble) -> None:
    tokens, _ = _staggered(variant)
    for i in range(len(PROMPTS)):
        if PROMPTS[i][2].seed is not None or not PROMPTS[i][2].do_sample:
            assert tokens[i] == _alone(variant, i), i


def test_only_top1_prompts_with_valid_settings_join(ensemble: RoutedEnsemble) -> None:
    image = picture("red-square")
    assert runs_here(ensemble, Joining(image, "Hi"), None)  # the manifest's top-1
    assert runs_here(ensemble, Joining(image, "Hi"), 1)
    assert not runs_here(ensemble, Joining(image, "Hi"), 2)  # a mixture steps in lock-step
    assert not runs_here(ensemble, Joining(None, "Hi"), 1)  # routed by the posterior
    assert not runs_here(ensemble, Joining(image, "Hi", True, 0.0), 1)  # refused by generate
    assert not runs_here(ensemble, Joining(image, "Hi", top_p=0.0), 1)
