"""Fitting the router's temperature on held-out data, as the authors do.

The ensemble's probability of a reference answer ``y`` to question ``q`` about image ``x`` is
the mixture ``p(y | x, q) = sum_k softmax_k(tau * cos(f(x), c_k)) * p_k(y | x, q)``. Each
expert's ``log p_k(y | x, q)`` (teacher-forced, the answer's tokens and end-of-sequence after
the chat prompt, exactly as generation would score them) and the router's cosines do not
depend on tau, so they are computed once; tau is then the bounded 1-D maximiser of
``mean_i log p(y_i | x_i, q_i)``: a grid over log tau (which includes every value compared)
and Brent's bounded method around the grid's best, so the fitted value is never worse than
any value it is compared with.

Example::

    ensemble = RoutedEnsemble.from_pretrained("ensemble/")
    scores = answer_log_likelihoods(ensemble, images, questions, answers)
    fit = fit_tau(scores, compare=(1.0, 20.0, 50.0))
    fit.tau, fit.log_likelihood, fit.compared
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble.router import open_image
from ensemble.scheduling import slices
from protocol.errors import InvalidArgument

__all__ = [
    "AnswerScores",
    "TauFitResult",
    "answer_log_likelihoods",
    "fit_tau",
    "mixture_log_likelihood",
]

DEFAULT_BOUNDS = (0.1, 1000.0)
_GRID_POINTS = 41


@dataclass(frozen=True)
class AnswerScores:
    """What the fit needs, per held-out sample.

    Attributes:
        cosines: ``(N, K)`` the router's cosines (centred as the router centres).
        log_likelihoods: ``(N, K)`` ``log p_k(answer | image, question)``; -inf for experts
            the ensemble does not have.
        router: the ensemble's router (its mask of present experts).
    """

    cosines: torch.Tensor
    log_likelihoods: torch.Tensor
    router: Any


@dataclass(frozen=True)
class TauFitResult:
    """The fitted tau, its mean log-likelihood per sample, and the same at compared values."""

    tau: float
    log_likelihood: float
    bounds: tuple[float, float]
    compared: dict[float, float] = field(default_factory=dict)


def answer_log_likelihoods(
    ensemble: Any,
    images: Sequence[Path | Any],
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> AnswerScores:
    """Router cosines and every present expert's log-likelihood of each reference answer.

    Raises:
        InvalidArgument: mismatched lengths, or an ensemble of text-only experts.
    """
    if not (len(images) == len(questions) == len(answers)) or not images:
        raise InvalidArgument(
            f"fit data: expected one image, question and answer per sample, got {len(images)}, "
            f"{len(questions)} and {len(answers)}"
        )
    if ensemble.manifest.architecture == "causal-lm":
        raise InvalidArgument("--fit-tau: a causal-lm ensemble has no image router to fit")
    k = ensemble.manifest.num_experts
    cosines = torch.empty(len(images), k)
    scores = torch.full((len(images), k), float("-inf"))
    for part in slices(len(images), batch_size):
        pictures = [open_image(image) for image in images[part]]
        with torch.inference_mode():
            features = ensemble.feature_model.encode_images(pictures)
            cosines[part] = ensemble.router.cosines(features).cpu()
        batch = _teacher_forced(ensemble, pictures, questions[part], answers[part])
        for expert in ensemble.manifest.present_experts:
            scores[part, expert] = _answer_log_likelihood(ensemble.experts.model(expert), batch)
        if progress is not None:
            progress(len(pictures))
    return AnswerScores(cosines, scores, ensemble.router)


def _teacher_forced(
    ensemble: Any, pictures: list[Any], questions: Sequence[str], answers: Sequence[str]
) -> dict[str, Any]:
    """Prompt (as generation builds it) + answer tokens + end-of-sequence, left-padded, with
    each row's answer length."""
    prompts = ensemble.encode_inputs(pictures, list(questions))
    tokenizer = ensemble.tokenizer
    eos = tokenizer.eos_token_id
    rows, lengths = [], []
    for ids, mask, answer in zip(
        prompts["input_ids"], prompts["attention_mask"], answers, strict=True
    ):
        tail = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        rows.append(ids[mask.bool()].tolist() + tail)
        lengths.append(len(tail))
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batch = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask")}
    batch["input_ids"] = input_ids.to(ensemble.device)
    batch["attention_mask"] = attention.to(ensemble.device)
    batch["answer_lengths"] = lengths
    return batch


def _answer_log_likelihood(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "answer_lengths"}
    mask = inputs["attention_mask"]
    # As generation does for left-padded rows: positions count real tokens.
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.inference_mode():
        logits = model(**inputs, position_ids=positions).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = inputs["input_ids"][:, 1:]
    per_token = log_probs.gather(-1, targets[..., None])[..., 0]
    width = per_token.shape[1]
    counted = torch.zeros_like(per_token, dtype=torch.bool)
    for row, length in enumerate(batch["answer_lengths"]):
        counted[row, width - length :] = True
    return torch.where(counted, per_token, torch.zeros_like(per_token)).sum(-1).cpu()


def mixture_log_likelihood(scores: AnswerScores, tau: float) -> float:
    """Mean over samples of ``log sum_k softmax_k(tau * cos)_k * p_k(answer)``."""
    weights = scores.router.probabilities_at(scores.cosines, tau).clamp_min(1e-45).log()
    total = torch.logsumexp(weights.double() + scores.log_likelihoods.double(), dim=-1)
    return float(total.mean())


def fit_tau(
    scores: AnswerScores,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    compare: Sequence[float] = (1.0, 20.0, 50.0),
) -> TauFitResult:
    """The tau in ``bounds`` that maximises :func:`mixture_log_likelihood`.

    Raises:
        InvalidArgument: bounds that are not ``0 < low < high`` and finite.
    """
    low, high = bounds
    if not (0 < low < high and math.isfinite(high)):
        raise InvalidArgument(f"tau bounds: expected 0 < low < high, got {bounds}")
    from scipy.optimize import minimize_scalar

    def objective(log_tau: float) -> float:
        return -mixture_log_likelihood(scores, math.exp(log_tau))

    compared = {float(t): mixture_log_likelihood(scores, float(t)) for t in compare}
    grid = np.linspace(math.log(low), math.log(high), _GRID_POINTS)
    candidates = [(objective(float(x)), float(x)) for x in grid]
    candidates += [(-ll, math.log(t)) for t, ll in compared.items() if low <= t <= high]
    best_value, best_x = min(candidates)
    step = float(grid[1] - grid[0])
    around = (max(grid[0], best_x - step), min(grid[-1], best_x + step))
    refined = minimize_scalar(objective, bounds=around, method="bounded", options={"xatol": 1e-4})
    if refined.success and float(refined.fun) < best_value:
        best_value, best_x = float(refined.fun), float(refined.x)
    return TauFitResult(math.exp(best_x), -best_value, (low, high), compared)
