"""How a routed generation chooses its tokens, and how a seed makes that reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Sampling", "call_seed", "rng_devices"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedily, or sampled with a temperature and nucleus."""

    do_sample: bool
    temperature: float
    seed: int | None
    top_p: float = 1.0

    def generator(self, device: torch.device, call: int) -> torch.Generator:
        generator = torch.Generator(device=device)
        if self.seed is not None:
            generator.manual_seed(call_seed(self.seed, call))
        else:
            generator.seed()
        return generator

    def choose(self, log_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.do_sample:
            return log_probs.argmax(dim=-1)
        probabilities = torch.softmax(log_probs / self.temperature, dim=-1)
        if self.top_p < 1:
            # The nucleus: the most likely tokens until their mass reaches top_p (the first
            # always stays), as transformers' TopPLogitsWarper keeps them.
            ordered, order = probabilities.sort(dim=-1, descending=True)
            outside = ordered.cumsum(dim=-1) - ordered >= self.top_p
            kept = ordered.masked_fill(outside, 0.0)
            probabilities = torch.zeros_like(probabilities).scatter(-1, order, kept)
        return torch.multinomial(probabilities, 1, generator=generator)[:, 0]


def call_seed(seed: int, call: int) -> int:
    """The seed of a generation's ``call``-th model call of one kind."""
    # Call 0 keeps the seed itself: one call of every sample samples as it always did.
    return seed + 1_000_003 * call


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose random state a seeded ``generate`` on ``device`` touches."""
    return [device.index or 0] if device.type == "cuda" else []
