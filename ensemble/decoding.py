"""The decoding loops of a routed generation, over one call's samples.

* :func:`top1`: each sample through its one expert; the experts' own batched ``generate``,
  so the answer is the expert's own, token for token.
* :func:`lockstep`: top-k > 1 and the posterior router; the chosen experts step together,
  each with its own KV cache (:class:`ExpertState`), and the next token comes from the
  mixture ``log p(x) = logsumexp_k(log w_k + log p_k(x))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ensemble.encoded_batch import EncodedBatch
from ensemble.expert_pool import Unit
from ensemble.sampling import Sampling, call_seed, rng_devices

if TYPE_CHECKING:
    from ensemble.runtime import RoutedEnsemble

__all__ = [
    "ExpertState",
    "TokenWatcher",
    "end_tokens",
    "lockstep",
    "top1",
    "trim",
]

TokenWatcher = Callable[[list[int], list[int]], list[bool]]
"""Called after every decoding step with the samples still decoding (their positions in the
call) and the token each just chose (the end-of-sequence token included, once); returns, per
sample, whether to stop it there (a server streams the tokens and stops a sample whose client
left or whose own ``max_tokens`` is reached). A stopped sample keeps the tokens it chose."""


def end_tokens(tokenizer: Any) -> set[int]:
    """The end-of-sequence token ids (none when the tokenizer has no such token)."""
    eos = tokenizer.eos_token_id
    return {int(eos)} if eos is not None else set()


def trim(tokenizer: Any, ids: list[int]) -> list[int]:
    """``ids`` up to their first end-of-sequence token (after it is padding that batching
    added)."""
    eos = end_tokens(tokenizer)
    for position, token in enumerate(ids):
        if token in eos:
            return ids[:position]
    return ids


def top1(
    ensemble: RoutedEnsemble,
    batch: EncodedBatch,
    chosen: dict[int, int],
    max_new_tokens: int,
    sampling: Sampling,
    call: int,
    watch: TokenWatcher | None = None,
) -> dict[int, list[int]]:
    """Top-1: the samples grouped by expert, each unit one batched ``generate`` (one for
    the whole batch when the experts stack or are LoRA adapters over one base)."""
    order = sorted(chosen, key=lambda i: (chosen[i], i))
    units = ensemble.experts.units([chosen[i] for i in order], [batch.has_image[i] for i in order])
    options: dict[str, Any] = {"do_sample": sampling.do_sample}
    if sampling.do_sample:
        options.update(temperature=sampling.temperature, top_k=0, top_p=sampling.top_p)
    tokens: dict[int, list[int]] = {}
    for unit in units:
        members = order[unit.start : unit.end]
        inputs = batch.select(members)
        if watch is not None:
            options["stopping_criteria"] = watching(watch, members, end_tokens(ensemble.tokenizer))
        with torch.random.fork_rng(devices=rng_devices(ensemble.device)):
            if sampling.seed is not None:
                torch.manual_seed(call_seed(sampling.seed, call) + unit.start)
            output = unit(
                "generate",
                **inputs,
                max_new_tokens=max_new_tokens,
                pad_token_id=ensemble.tokenizer.pad_token_id,
                **options,
            )
        start = inputs["input_ids"].shape[1]
        for i, row in zip(members, output[:, start:].tolist(), strict=True):
            tokens[i] = trim(ensemble.tokenizer, row)
    return tokens


def lockstep(
    ensemble: RoutedEnsemble,
    batch: EncodedBatch,
    plan: dict[int, tuple[list[int], list[float]]],
    top_k: int,
    max_new_tokens: int,
    sampling: Sampling,
    posterior: bool,
    call: int,
    watch: TokenWatcher | None = None,
) -> dict[int, tuple[list[int], torch.Tensor | None]]:
    """Top-k > 1 and the posterior: experts step together, each with its own KV cache over
    the samples routed to it, and the next token comes from the mixture.

    A row is one (sample, expert) pair; rows are grouped by expert and run as few model
    calls as :meth:`ExpertPool.units` allows (one, for stacked or LoRA experts). Sample
    ``b``'s ``j``-th expert writes ``log_probs[b, j]``; ``log_weights[b, j]`` is its
    ``log w``. With ``posterior``, ``plan`` holds the priors; every expert's probability
    of the prompt and of each chosen token updates ``log p(S_k | z)``, and the step
    mixes its top-k.
    """
    samples = sorted(plan)
    width = max(len(chosen) for chosen, _ in plan.values())
    vocab = ensemble.experts.vocab_size(ensemble.manifest.present_experts[0])
    # -inf marks an unused slot (a sample mixing fewer experts than the widest).
    log_weights = torch.full((len(samples), width), float("-inf"))
    rows: list[tuple[int, int, int]] = []  # (expert, sample position, slot)
    for b, sample in enumerate(samples):
        chosen, ws = plan[sample]
        log_weights[b, : len(chosen)] = torch.tensor(ws).log()
        rows.extend((expert, b, j) for j, expert in enumerate(chosen))
    rows.sort()
    log_weights = log_weights.to(ensemble.device)
    row_sample = torch.tensor([b for _, b, _ in rows], device=ensemble.device)
    row_slot = torch.tensor([j for _, _, j in rows], device=ensemble.device)
    units = ensemble.experts.units(
        [e for e, _, _ in rows], [batch.has_image[samples[b]] for _, b, _ in rows]
    )
    log_probs = torch.full((len(samples), width, vocab), float("-inf"), device=ensemble.device)
    states: list[tuple[Unit, ExpertState, slice]] = []
    for unit in units:
        part = slice(unit.start, unit.end)
        inputs = batch.select([samples[b] for _, b, _ in rows[part]])
        state, logits = ExpertState.prefill(unit, inputs, all_logits=posterior)
        at = (row_sample[part], row_slot[part])
        log_probs[at] = torch.log_softmax(logits[:, -1].float(), -1)
        if posterior:
            log_weights[at] += _sequence_log_likelihood(logits, inputs)
        states.append((unit, state, part))
    history: list[torch.Tensor] = []
    if posterior:
        log_weights = torch.log_softmax(log_weights, dim=-1)
        history.append(log_weights.exp())
    eos = torch.tensor(
        sorted(end_tokens(ensemble.tokenizer)), dtype=torch.long, device=ensemble.device
    )
    pad = torch.tensor(ensemble.tokenizer.pad_token_id, device=ensemble.device)
    finished = torch.zeros(len(samples), dtype=torch.bool, device=ensemble.device)
    everyone = torch.arange(len(samples), device=ensemble.device)
    chosen_tokens: list[torch.Tensor] = []
    generator = sampling.generator(ensemble.device, call)
    for position in range(max_new_tokens):
        mix = _top_k_renormalised(log_weights, top_k) if posterior else log_weights
        mixed = torch.logsumexp(mix[:, :, None] + log_probs, dim=1)
        next_tokens = torch.where(finished, pad, sampling.choose(mixed, generator))
        chosen_tokens.append(next_tokens)
        if posterior:
            step = log_probs[everyone, :, next_tokens]
            update = torch.where(finished[:, None], torch.zeros_like(step), step)
            log_weights = torch.log_softmax(log_weights + update, dim=-1)
            history.append(log_weights.exp())
        if watch is not None:
            live = (~finished).nonzero()[:, 0].tolist()
            stop = watch([samples[b] for b in live], next_tokens[live].tolist())
            finished[[b for b, s in zip(live, stop, strict=True) if s]] = True
        finished |= torch.isin(next_tokens, eos)
        if position == max_new_tokens - 1 or bool(finished.all()):
            break
        for unit, state, part in states:
            logits = state.step(unit, next_tokens[row_sample[part]])
            log_probs[row_sample[part], row_slot[part]] = torch.log_softmax(logits.float(), -1)
    generated = torch.stack(chosen_tokens, dim=1).tolist()
    results: dict[int, tuple[list[int], torch.Tensor | None]] = {}
    for b, sample in enumerate(samples):
        trajectory = None
        if posterior:
            chosen = plan[sample][0]
            trajectory = torch.zeros(len(history), ensemble.manifest.num_experts)
            trajectory[:, chosen] = torch.stack([h[b, : len(chosen)] for h in history]).cpu()
        results[sample] = (trim(ensemble.tokenizer, generated[b]), trajectory)
    return results


def watching(watch: TokenWatcher, members: list[int], eos: set[int]) -> Any:
    """``watch`` as transformers' stopping criteria of one ``generate`` over ``members``:
    called after each step, it stops the rows ``watch`` stops; rows past their
    end-of-sequence token (padding from then on) are not shown again."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Watching(StoppingCriteria):
        def __init__(self) -> None:
            self.done = [False] * len(members)

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            tokens = input_ids[:, -1].tolist()
            live = [row for row, done in enumerate(self.done) if not done]
            stop = watch([members[row] for row in live], [tokens[row] for row in live])
            stopped = torch.zeros(len(members), dtype=torch.bool, device=input_ids.device)
            for row, halt in zip(live, stop, strict=True):
                self.done[row] = halt or tokens[row] in eos
                stopped[row] = halt
            return stopped

    return StoppingCriteriaList([Watching()])


@dataclass
class ExpertState:
    """One unit's KV cache, attention mask and positions over its rows."""

    past: Any
    attention_mask: torch.Tensor
    last_position: torch.Tensor

    @classmethod
    def prefill(
        cls, unit: Unit, inputs: dict[str, torch.Tensor], all_logits: bool
    ) -> tuple[ExpertState, torch.Tensor]:
        mask = inputs["attention_mask"]
        # As transformers' generate does for left-padded batches: positions count real tokens.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        keep = 0 if all_logits else 1  # the prompt's likelihood needs every position
        output = unit(
            "__call__", **inputs, position_ids=positions, use_cache=True, logits_to_keep=keep
        )
        return cls(output.past_key_values, mask, positions[:, -1:]), output.logits

    def step(self, unit: Unit, tokens: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones((len(tokens), 1))], dim=-1
        )
        self.last_position = self.last_position + 1
        output = unit(
            "__call__",
            input_ids=tokens[:, None],
            attention_mask=self.attention_mask,
            position_ids=self.last_position,
            past_key_values=self.past,
            use_cache=True,
        )
        self.past = output.past_key_values
        logits: torch.Tensor = output.logits[:, -1]
        return logits


def _sequence_log_likelihood(logits: torch.Tensor, inputs: Any) -> torch.Tensor:
    """``sum_t log p(z_t | z_<t)`` of each prompt (padding and the first token excluded)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    counted = (mask[:, :-1] * mask[:, 1:]).bool()
    return torch.where(counted, per_token, torch.zeros_like(per_token)).sum(dim=-1)


def _top_k_renormalised(log_weights: torch.Tensor, top_k: int) -> torch.Tensor:
    """``log_weights`` kept at their ``top_k`` largest per row and renormalised."""
    values, indices = log_weights.topk(top_k, dim=-1)
    kept = torch.full_like(log_weights, float("-inf")).scatter(-1, indices, values)
    return torch.log_softmax(kept, dim=-1)
