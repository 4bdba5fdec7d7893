"""A top-1 decoding batch that prompts join and leave between steps (continuous batching).

A server's requests arrive while others are generating. :class:`RunningBatch` lets them join
the running batch at the next decoding step instead of waiting for the whole batch to end,
and lets finished ones leave, freeing their rows. It owns the decoding loop that
``generate`` would otherwise hide:

* **joining** (:meth:`RunningBatch.join`): the new prompts are encoded and routed (top-1)
  together, and prefilled one expert's rows per call; their KV caches are then merged into
  the running batch's. Rows of different
  lengths are left-padded to one length: the padding's attention mask is 0 and every row
  keeps its own position ids, so a row attends to exactly its own tokens wherever it sits.
* **stepping** (:meth:`RunningBatch.step`): every live row feeds its last token, in as few
  model calls as :meth:`ExpertPool.units` allows (one, for stacked or LoRA experts; rows
  are kept grouped by expert).
* **choosing** (:meth:`RunningBatch.choose`): greedy rows take the argmax; sampled rows go
  through transformers' own temperature and top-p warpers and draw from their own
  ``torch.Generator``, seeded with the request's seed. A seeded row therefore samples
  exactly as ``generate([image], [prompt], seed=s)`` samples for that prompt alone,
  whatever else is in the batch; greedy rows answer as the expert's own ``generate``.
* **leaving** (:meth:`RunningBatch.leave`): a row that is done is dropped at the next
  join (or once dead rows outnumber live ones): until then it feeds padding, which costs
  less than copying the caches at every step.

Top-k > 1 mixtures and the posterior router step whole batches in lock-step
(:func:`ensemble.decoding.lockstep`); they are not run here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ensemble.decoding import ExpertState
from ensemble.encoded_batch import EncodedBatch
from ensemble.expert_pool import Unit
from ensemble.runtime import RoutedEnsemble
from ensemble.sampling import Sampling
from ensemble.stacked_experts import runs
from protocol.ensemble_manifest import TextOnlyStrategy

__all__ = ["Joining", "Row", "RunningBatch", "Unsupported", "runs_here"]


class Unsupported(Exception):
    """The experts' KV cache cannot be merged row by row (e.g. sliding-window layers)."""


@dataclass(frozen=True)
class Joining:
    """A prompt that joins the running batch, with how its tokens are chosen."""

    image: Image.Image | None
    prompt: str
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Row:
    """One prompt decoding in the batch."""

    handle: Any  # the caller's (a server's job)
    expert: int
    weight: float
    sampler: _Sampler | None  # None: greedy
    live: bool = True


@dataclass
class _Sampler:
    warpers: Any  # transformers' LogitsProcessorList
    generator: torch.Generator

    def choose(self, logits: torch.Tensor) -> int:
        scores = self.warpers(_NO_IDS, logits[None])
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=self.generator)[0, 0])


_NO_IDS = torch.empty((1, 0), dtype=torch.long)


def runs_here(ensemble: RoutedEnsemble, joining: Joining, top_k: int | None) -> bool:
    """Whether a request can join a running batch: top-1 routed by an image (or by CLIP text),
    with valid sampling settings. Everything else (mixtures, the posterior router, settings
    :meth:`RoutedEnsemble.generate_tokens` refuses) runs as a whole ``generate_tokens`` call,
    which also words the errors."""
    manifest = ensemble.manifest
    k = manifest.router.top_k if top_k is None else top_k
    if k != 1 or not 0 < joining.top_p <= 1:
        return False
    if joining.do_sample and not joining.temperature > 0:
        return False
    if joining.image is not None:
        return manifest.architecture != "causal-lm"
    clip_text = manifest.router.text_only is TextOnlyStrategy.CLIP_TEXT
    return clip_text and hasattr(ensemble.feature_model, "encode_texts")


class RunningBatch:
    """The rows decoding now; see the module docstring.

    Args:
        ensemble: The loaded ensemble (only one thread may use it and this batch).
    """

    def __init__(self, ensemble: RoutedEnsemble) -> None:
        self.ensemble = ensemble
        self.device = ensemble.device
        self.rows: list[Row] = []
        # Per layer, keys and values of every row: (rows, heads, length, head_dim); between
        # changes of the rows they live in the model calls' caches (_calls) instead.
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._positions = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        self._logits = torch.zeros((0, 0), device=self.device)  # each row's next-token logits
        self._calls: list[tuple[Unit, Any, int, int]] = []  # (unit, its cache, start, end)
        self._pad = int(ensemble.tokenizer.pad_token_id)

    @property
    def live(self) -> int:
        """Rows still decoding."""
        return sum(row.live for row in self.rows)

    # -- joining ------------------------------------------------------------------------------

    def join(self, handles: Sequence[Any], joining: Sequence[Joining]) -> list[Row]:
        """Encodes, routes (top-1) and prefills ``joining``; their rows decode from the next
        :meth:`choose` on. Returns the new rows (in ``joining``'s order).

        Raises:
            Unsupported: the experts' caches cannot be merged (nothing was joined).
            AtollError: an input :meth:`RoutedEnsemble.generate_tokens` would refuse.
        """
        ensemble = self.ensemble
        pictures = [j.image for j in joining]
        prompts = [j.prompt for j in joining]
        batch = EncodedBatch(ensemble.encode_inputs, pictures, prompts)
        strategy = ensemble.manifest.router.text_only
        routes = ensemble.static_routes(batch, prompts, 1, strategy, None)
        chosen = []
        for i, route in enumerate(routes):
            assert route is not None and len(route[0]) == 1, "runs_here admits top-1 only"
            chosen.append((route[0][0], route[1][0], i))
        chosen.sort(key=lambda c: (c[0], c[2]))  # grouped by expert, as generate groups them
        order = [i for _, _, i in chosen]
        units = self._prefill_units(
            [e for e, _, _ in chosen], [pictures[i] is not None for i in order]
        )
        parts: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]] = []
        logits = []
        with ensemble.handing_tower(batch), torch.inference_mode():
            for unit in units:
                inputs = batch.select(order[unit.start : unit.end])
                state, output = ExpertState.prefill(unit, inputs, all_logits=False)
                parts.append((_layers(state.past), state.attention_mask, state.last_position))
                logits.append(output[:, -1].float())
        new_rows = [
            Row(handles[i], expert, weight, _sampler(joining[i], self.device))
            for expert, weight, i in chosen
        ]
        self._compact(regroup=False)
        for layers, mask, positions in parts:
            self._merge(layers, mask, positions)
        self._logits = _cat_rows([self._logits, *logits], self._logits)
        self.rows.extend(new_rows)
        self._regroup()
        by_input = {i: row for (_, _, i), row in zip(chosen, new_rows, strict=True)}
        return [by_input[i] for i in range(len(joining))]

    def _prefill_units(self, experts: list[int], images: list[bool]) -> list[Unit]:
        """One expert's rows per prefill call: a prefill is arithmetic, and a call shared by
        stacked experts pads their unequal runs of rows to one length (decoding steps, bound
        by per-call overhead, share one call instead)."""
        units = []
        for _, start, end in runs(experts):
            for unit in self.ensemble.experts.units(experts[start:end], images[start:end]):
                unit.start += start
                unit.end += start
                units.append(unit)
        return units

    # -- decoding -----------------------------------------------------------------------------

    def choose(self) -> list[int | None]:
        """Each row's next token (None for rows that left)."""
        tokens: list[int | None] = [None] * len(self.rows)
        greedy = [i for i, row in enumerate(self.rows) if row.live and row.sampler is None]
        if greedy:
            picked = self._logits[greedy].argmax(dim=-1).tolist()
            for i, token in zip(greedy, picked, strict=True):
                tokens[i] = token
        for i, row in enumerate(self.rows):
            if row.live and row.sampler is not None:
                tokens[i] = row.sampler.choose(self._logits[i])
        return tokens

    def leave(self, rows: Sequence[Row]) -> None:
        """Stops ``rows``; their slots are free now, their caches go at the next join."""
        for row in rows:
            row.live = False
        if not any(row.live for row in self.rows):
            self.clear()

    def step(self, tokens: Sequence[int | None]) -> None:
        """Feeds each live row its chosen token (``tokens`` as :meth:`choose` gave them; left
        rows feed padding), so the next :meth:`choose` has the following token's logits."""
        if not self.rows:
            return
        if 2 * self.live < len(self.rows):
            keep = [i for i, row in enumerate(self.rows) if row.live]
            tokens = [tokens[i] for i in keep]
            self._compact()
        fed = torch.tensor(
            [self._pad if t is None else t for t in tokens], dtype=torch.long, device=self.device
        )
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(fed), 1))], dim=-1)
        self._positions = self._positions + 1
        with torch.inference_mode():
            for unit, cache, start, end in self._calls:
                output = unit(
                    "__call__",
                    input_ids=fed[start:end, None],
                    attention_mask=self._mask[start:end],
                    position_ids=self._positions[start:end],
                    past_key_values=cache,
                    use_cache=True,
                )
                self._logits[start:end] = output.logits[:, -1].float()

    def clear(self) -> None:
        """Drops every row and cache."""
        self.rows = []
        self._layers = []
        self._calls = []
        self._mask = self._mask[:0, :0]
        self._positions = self._positions[:0]
        self._logits = self._logits[:0]

    # -- the caches ---------------------------------------------------------------------------

    def _gather(self) -> None:
        """The per-call caches back into ``_layers`` (after the steps they took)."""
        if not self._calls:
            return
        caches = [_layers(cache) for _, cache, _, _ in self._calls]
        self._layers = [
            (
                _cat_rows([c[n][0] for c in caches], None),
                _cat_rows([c[n][1] for c in caches], None),
            )
            for n in range(len(caches[0]))
        ]
        self._calls = []

    def _compact(self, regroup: bool = True) -> None:
        """Drops the rows that left, and padding columns no row needs any more."""
        self._gather()
        keep = [i for i, row in enumerate(self.rows) if row.live]
        if len(keep) < len(self.rows):
            self._select(keep)
        if not self.rows:
            self.clear()
            return
        first = int(self._mask.any(dim=0).int().argmax())
        if first:
            self._mask = self._mask[:, first:]
            self._layers = [(k[..., first:, :], v[..., first:, :]) for k, v in self._layers]
        if regroup:
            self._regroup()

    def _select(self, rows: list[int]) -> None:
        """Keeps ``rows`` (of the gathered rows), in that order, with their caches."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in rows]
        self._layers = [(k[index], v[index]) for k, v in self._layers]
        self._mask = self._mask[index]
        self._positions = self._positions[index]
        self._logits = self._logits[index]

    def _merge(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Appends rows (their caches, masks and positions), left-padding the shorter side."""
        self._gather()
        if not self._layers:
            self._layers, self._mask, self._positions = layers, mask, positions
            return
        length = max(self._mask.shape[1], mask.shape[1])
        self._layers = [
            (
                torch.cat([_pad_left(k, length), _pad_left(nk, length)]),
                torch.cat([_pad_left(v, length), _pad_left(nv, length)]),
            )
            for (k, v), (nk, nv) in zip(self._layers, layers, strict=True)
        ]
        self._mask = torch.cat([_pad_mask(self._mask, length), _pad_mask(mask, length)])
        self._positions = torch.cat([self._positions, positions])

    def _regroup(self) -> None:
        """Orders the rows by expert (stacked experts and per-row adapters need each
        expert's rows adjacent) and splits the caches into this step's model calls."""
        self._gather()
        if not self.rows:
            self.clear()
            return
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].expert)
        if order != list(range(len(self.rows))):
            self._select(order)
        from transformers import DynamicCache

        units = self.ensemble.experts.units([r.expert for r in self.rows], [False] * len(self.rows))
        self._calls = [
            (
                unit,
                DynamicCache(
                    ddp_cache_data=[
                        (k[unit.start : unit.end], v[unit.start : unit.end])
                        for k, v in self._layers
                    ]
                ),
                unit.start,
                unit.end,
            )
            for unit in units
        ]
        self._layers = []


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        raise Unsupported(
            f"the experts' KV cache ({type(cache).__name__} with "
            f"{sorted({type(layer).__name__ for layer in layers or []})}) cannot be merged row "
            "by row"
        )
    return [(layer.keys, layer.values) for layer in layers]


def _sampler(joining: Joining, device: torch.device) -> _Sampler | None:
    if not joining.do_sample:
        return None
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    # What transformers' generate applies for these settings (the runtime's top-1 path
    # passes top_k=0), in its order.
    warpers = LogitsProcessorList()
    if joining.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(joining.temperature))
    if joining.top_p < 1.0:
        warpers.append(TopPLogitsWarper(joining.top_p))
    sampling = Sampling(True, joining.temperature, joining.seed, joining.top_p)
    # The generator generate's top-1 path draws from for a prompt alone: its call 0.
    return _Sampler(warpers, sampling.generator(device, call=0))


def _pad_left(states: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - states.shape[-2]
    if missing == 0:
        return states
    return torch.nn.functional.pad(states, (0, 0, missing, 0))


def _pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))


def _cat_rows(parts: list[torch.Tensor], empty: torch.Tensor | None) -> torch.Tensor:
    present = [p for p in parts if p.shape[0] > 0]
    if len(present) == 1:
        return present[0]
    if not present:
        assert empty is not None
        return empty
    return torch.cat(present)
