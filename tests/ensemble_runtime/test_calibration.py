"""Fitting tau: the mixture's log-likelihood of reference answers, maximised in bounds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ensemble.calibration import (
    AnswerScores,
    answer_log_likelihoods,
    fit_tau,
    mixture_log_likelihood,
)
from ensemble.router import Router
from ensemble.runtime import chat_prompt
from protocol.ensemble_manifest import expert_path
from protocol.errors import InvalidArgument

from .builders import picture


def _scores(seed: int = 0, n: int = 200) -> AnswerScores:
    """Samples whose router cosines favour the expert that explains their answer best, with
    noise: neither a flat mixture (tau -> 0) nor a hard one (tau -> inf) is best."""
    generator = torch.Generator().manual_seed(seed)
    centroids = torch.eye(3, 8)
    router = Router(centroids, tau=1.0, top_k=1)
    own = torch.randint(0, 3, (n,), generator=generator)
    features = centroids[own] + 0.9 * torch.randn(n, 8, generator=generator)
    cosines = router.cosines(features)
    log_likelihoods = torch.full((n, 3), -6.0)
    log_likelihoods[torch.arange(n), own] = -1.0
    return AnswerScores(cosines, log_likelihoods, router)


def test_mixture_log_likelihood_is_the_formula() -> None:
    scores = _scores(n=5)
    weights = torch.softmax(20.0 * scores.cosines, -1)
    expected = torch.log((weights * scores.log_likelihoods.exp()).sum(-1)).mean()
    assert mixture_log_likelihood(scores, 20.0) == pytest.approx(float(expected), rel=1e-6)


def test_fitted_tau_is_at_least_as_likely_as_every_compared_value() -> None:
    scores = _scores()
    fit = fit_tau(scores, compare=(1.0, 20.0, 50.0))
    assert 0.1 <= fit.tau <= 1000.0 and set(fit.compared) == {1.0, 20.0, 50.0}
    assert all(fit.log_likelihood >= value for value in fit.compared.values())
    assert fit.log_likelihood == pytest.approx(mixture_log_likelihood(scores, fit.tau))
    # An interior optimum: a little either side is worse.
    for factor in (0.8, 1.25):
        assert mixture_log_likelihood(scores, fit.tau * factor) < fit.log_likelihood
    # A fine scan finds nothing better.
    scan = [math.exp(x / 20) for x in range(-46, 139)]
    assert max(mixture_log_likelihood(scores, t) for t in scan) <= fit.log_likelihood + 1e-9


def test_absent_experts_get_no_weight_and_bounds_are_checked() -> None:
    scores = _scores(n=20)
    partial = AnswerScores(
        scores.cosines,
        scores.log_likelihoods.index_fill(1, torch.tensor([2]), float("-inf")),
        Router(torch.eye(3, 8), tau=1.0, top_k=1, available=[0, 1]),
    )
    assert math.isfinite(mixture_log_likelihood(partial, 30.0))
    with pytest.raises(InvalidArgument, match="expected 0 < low < high"):
        fit_tau(scores, bounds=(10.0, 1.0))


def test_answer_log_likelihoods_are_each_experts_own(ensemble_dir: Path, ensemble: Any) -> None:
    """Batched and left-padded, each expert's score of an answer is what the expert alone,
    loaded with plain transformers, gives the prompt + answer + end-of-sequence."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    images = [picture("red-square", 1), picture("blue-circle", 2)]
    questions, answers = (
        ["What is it?", "And what colour is this one, please?"],
        ["red", "a blue circle"],
    )
    scores = answer_log_likelihoods(ensemble, images, questions, answers, batch_size=2)
    assert scores.log_likelihoods.shape == scores.cosines.shape == (2, 2)
    torch.testing.assert_close(
        scores.cosines, ensemble.router.cosines(ensemble.feature_model.encode_images(images))
    )
    for k in (0, 1):
        folder = ensemble_dir / expert_path(k)
        processor = AutoProcessor.from_pretrained(folder)
        model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
        for i, (image, question, answer) in enumerate(zip(images, questions, answers, strict=True)):
            prompt = chat_prompt(processor, question, True)
            inputs = processor(images=[image], text=[prompt], return_tensors="pt")
            tail = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
            tail = torch.tensor([[*tail, processor.tokenizer.eos_token_id]])
            ids = torch.cat([inputs["input_ids"], tail], dim=1)
            with torch.inference_mode():
                logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
            log_probs = torch.log_softmax(logits[0, :-1].float(), -1)
            own = log_probs[-tail.shape[1] :].gather(-1, tail[0, :, None]).sum()
            assert float(scores.log_likelihoods[i, k]) == pytest.approx(float(own), abs=1e-3)
