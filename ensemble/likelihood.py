"""How likely the ensemble finds a continuation: ``log p(continuation | prompt, image)``.

The mixture is the one :meth:`ensemble.runtime.RoutedEnsemble.generate` samples from: each
step mixes the routed experts' next-token probabilities, ``log sum_k w_k p_k(y_t | ...)``,
with the router's top-k weights (renormalised). For a text-only prompt routed by the
``posterior``, ``w`` at step t is the posterior after the prompt and the first t tokens,
``p(S_k | z) ∝ p(S_k) * prod p_k(z_s | z_<s)`` (its current top-k, renormalised), so with
``top_k = K`` the total is exactly Bayes' ``log sum_k p(S_k | prompt) p_k(continuation | prompt)``.
Multiple-choice benchmarks (lmms-eval's ``loglikelihood``) score answers with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ensemble.runtime import RoutedEnsemble
from protocol.ensemble_manifest import TextOnlyStrategy

__all__ = ["Likelihood", "continuation_log_likelihood"]


@dataclass(frozen=True)
class Likelihood:
    """How likely a continuation is.

    Attributes:
        log_probability: ``log p(continuation | prompt, image)``, summed over its tokens.
        tokens: How many tokens the continuation is.
        greedy: Whether every one of them is the mixture's most likely token.
    """

    log_probability: float
    tokens: int
    greedy: bool


@torch.inference_mode()
def continuation_log_likelihood(
    ensemble: RoutedEnsemble,
    image: Image.Image | None,
    prompt: str,
    continuation: str,
    top_k: int | None = None,
) -> Likelihood:
    """The log-probability of the continuation's tokens after the chat-formatted prompt, and
    whether each of them is the mixture's most likely token.

    Args:
        ensemble: The loaded ensemble.
        image: The prompt's image, or None (routed by the manifest's text-only strategy).
        prompt: The user's question (the chat template is applied here).
        continuation: The answer to score, as it follows the assistant's turn marker.
        top_k: Experts mixed (default: the manifest's ``router.top_k``).
    """
    text = ensemble.prompt_text(prompt, image is not None)
    full = _encode(ensemble, image, text + continuation)
    start = int(_encode(ensemble, image, text)["input_ids"].shape[1])
    ids = full["input_ids"][0]
    if len(ids) <= start:
        return Likelihood(0.0, 0, True)
    targets = ids[start:]
    k = min(ensemble.router.num_experts, top_k or ensemble.manifest.router.top_k)
    experts, log_weights, posterior = _routing(ensemble, image, prompt, k)
    per_expert, prompt_likelihood = [], []
    for expert in experts:
        logits = ensemble.experts.model(expert)(**full).logits[0].float()
        log_probs = torch.log_softmax(logits[:-1], dim=-1)  # row t predicts token t + 1
        per_expert.append(log_probs[start - 1 :])
        # The prompt's own likelihood (its first token excluded), for the posterior.
        prompt_likelihood.append(log_probs[: start - 1].gather(-1, ids[1:start, None]).sum())
    log_p = torch.stack(per_expert)  # (experts, steps, vocab)
    chosen = log_p.gather(-1, targets[None, :, None].expand(len(experts), -1, 1))[..., 0]
    if posterior:
        before = torch.cumsum(chosen, dim=1) - chosen  # the tokens before each step
        steps = log_weights.to(log_p.device)[:, None] + torch.stack(prompt_likelihood)[:, None]
        steps = _top_k(torch.log_softmax(steps + before, dim=0), k)
    else:
        steps = log_weights.to(log_p.device)[:, None].expand(-1, len(targets))
    mixture = torch.logsumexp(steps[:, :, None] + log_p, dim=0)  # (steps, vocab)
    total = float(mixture.gather(-1, targets[:, None]).sum())
    return Likelihood(total, len(targets), bool((mixture.argmax(dim=-1) == targets).all()))


def _routing(
    ensemble: RoutedEnsemble, image: Image.Image | None, prompt: str, k: int
) -> tuple[list[int], torch.Tensor, bool]:
    """The experts mixed, their log weights (for the posterior: their log priors), and
    whether the weights follow the posterior -- as ``generate`` routes."""
    present = ensemble.manifest.present_experts
    if image is not None:
        routing = ensemble.route_images([image], k)
    else:
        strategy = ensemble.manifest.router.text_only
        if strategy is TextOnlyStrategy.POSTERIOR:
            return present, ensemble.log_priors[present].float(), True
        if strategy is TextOnlyStrategy.UNIFORM:
            return present, torch.full((len(present),), 1.0 / len(present)).log(), False
        routing = ensemble.router.route(ensemble.feature_model.encode_texts([prompt]), k)
    return routing.experts[0].tolist(), routing.weights[0].float().log(), False


def _encode(ensemble: RoutedEnsemble, image: Image.Image | None, text: str) -> Any:
    if image is None:
        return ensemble.tokenizer([text], return_tensors="pt").to(ensemble.device)
    return ensemble.processor(images=[image], text=[text], return_tensors="pt").to(ensemble.device)


def _top_k(log_weights: torch.Tensor, k: int) -> torch.Tensor:
    """Per column of ``(experts, steps)``: the top ``k`` rows renormalised, the rest -inf."""
    if k >= log_weights.shape[0]:
        return log_weights
    values, rows = log_weights.topk(k, dim=0)
    kept = torch.full_like(log_weights, float("-inf")).scatter(0, rows, values)
    return torch.log_softmax(kept, dim=0)
