"""Full experts of one architecture stacked into one model.

A routed batch groups its rows by expert; experts fine-tuned from one base differ only in
their weights, so instead of one model call per expert per decoding step,
:class:`StackedExperts` runs expert 0's module tree once, its differing submodules sending
each stretch of rows (:func:`runs`) to that expert's own weights. Per-call overhead, not
arithmetic, dominates small models and small batches: this is what keeps a routed batch at
the cost of a dense one (see :mod:`ensemble.expert_pool`, which decides when to use it).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BlockLayout", "StackedExperts", "runs", "vision_tower"]


def runs(experts: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` for each stretch of adjacent rows of one expert."""
    runs: list[list[int]] = []
    for row, expert in enumerate(experts):
        if runs and runs[-1][0] == expert:
            runs[-1][2] = row + 1
        else:
            runs.append([expert, row, row + 1])
    return [(expert, start, end) for expert, start, end in runs]


# Config keys that name or date a checkpoint without changing what it computes.
_BOOKKEEPING_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}
)


class StackedExperts:
    """Full experts of one architecture as one model: a batch whose rows are grouped by
    expert runs as one forward pass, each row through its own expert's weights.

    Experts fine-tuned from one base differ only in their weights, so the model is expert
    0's module tree in which every submodule whose own weights differ between experts (the
    trained language model; not a frozen vision tower) is replaced by a
    :class:`_PerRowExperts` that sends each stretch of rows to that expert's own submodule.
    Nothing is copied: the submodules are the experts' own. One forward pass per decoding
    step instead of one per expert is what makes a routed batch cost what a dense one costs
    when per-call overhead, not arithmetic, dominates (small models, small batches); the
    arithmetic is the same either way.
    """

    def __init__(self, model: nn.Module, experts: set[int], differing: list[str]) -> None:
        self.model = model
        self.experts = experts
        self.differing = differing
        self._runs: dict[int, list[tuple[int, int, int]]] = {}
        self._layouts: dict[int, BlockLayout | None] = {}

    @classmethod
    def build(cls, models: dict[int, nn.Module], architecture: str) -> StackedExperts | None:
        """The stacked model, or None when the experts differ in more than their weights."""
        indices = sorted(models)
        first = models[indices[0]]
        if any(_config_key(models[i]) != _config_key(first) for i in indices[1:]):
            return None
        differing: list[str] = []
        for name, module in first.named_modules():
            if any(name.startswith(prefix + ".") for prefix in differing):
                continue
            try:
                others = [models[i].get_submodule(name) for i in indices[1:]]
            except AttributeError:
                return None
            own = _direct_tensors(module)
            for other in others:
                theirs = _direct_tensors(other)
                if type(other) is not type(module) or not _same_layout(own, theirs):
                    return None
            if any(not _same_values(own, _direct_tensors(other)) for other in others):
                differing.append(name)
        if "" in differing:
            return None
        tower = vision_tower(first)
        tower_name = next((n for n, m in first.named_modules() if m is tower), None)
        if (
            tower_name is not None
            and architecture != "llava"
            and any(n == tower_name or n.startswith(tower_name + ".") for n in differing)
        ):
            # Only LLaVA gives each image exactly one row of pixel_values (no tiles), which is
            # what lets a vision tower of its own run per row.
            return None
        shared = {id(t): t for t in [*first.parameters(), *first.buffers()]}
        model = copy.deepcopy(first, memo=shared)  # new modules, the same tensors
        stacked = cls(model, set(indices), differing)
        tied = {
            param.data_ptr()
            for expert in models.values()
            for _, param in _repeated_parameters(expert)
        }
        for name in differing:
            parent, _, child = name.rpartition(".")
            replacement = _PerRowExperts(
                tied, {i: models[i].get_submodule(name) for i in indices}, stacked
            )
            setattr(model.get_submodule(parent), child, replacement)
        return stacked

    def assign(
        self, rows: list[tuple[int, int, int]], image_rows: list[tuple[int, int, int]]
    ) -> None:
        """Sets the experts of the next forward pass's rows (and of its images' rows)."""
        runs = {_total(image_rows): image_rows}
        runs[_total(rows)] = rows  # every row has an image: both are the same
        self._runs = runs
        self._layouts = {n: BlockLayout.of(r, sorted(self.experts)) for n, r in runs.items()}

    def runs(self, rows: int) -> list[tuple[int, int, int]]:
        try:
            return self._runs[rows]
        except KeyError:
            raise RuntimeError(
                f"stacked experts: a tensor of {rows} rows, but the batch has "
                f"{sorted(self._runs)} (rows, image rows)"
            ) from None

    def layout(self, rows: int) -> BlockLayout | None:
        return self._layouts.get(rows)


@dataclass(frozen=True)
class BlockLayout:
    """Rows laid out as one equal block per expert, so a linear layer of every expert is one
    ``bmm`` over the stacked weights. Blocks of unequal runs are padded with copies of a row
    of theirs (``pad``), whose outputs ``unpad`` drops."""

    blocks: int
    pad: torch.Tensor | None
    unpad: torch.Tensor | None

    # Padding beyond this share of extra rows costs more than it saves.
    MAX_PADDING = 0.5

    @classmethod
    def of(cls, runs: list[tuple[int, int, int]], experts: list[int]) -> BlockLayout | None:
        if [expert for expert, _, _ in runs] != experts or len(runs) < 2:
            return None  # not every expert has rows: their stacked weights do not line up
        sizes = [end - start for _, start, end in runs]
        size = max(sizes)
        if len(runs) * size > (1 + cls.MAX_PADDING) * sum(sizes):
            return None
        if len(set(sizes)) == 1:
            return cls(len(runs), None, None)
        pad: list[int] = []
        unpad: list[int] = []
        for _, start, end in runs:
            unpad.extend(range(len(pad), len(pad) + end - start))
            pad.extend(list(range(start, end)) + [start] * (size - (end - start)))
        return cls(len(runs), torch.tensor(pad), torch.tensor(unpad))

    def linear(
        self, x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``x @ W_k.T + b_k`` for each row's expert ``k``; ``weights`` is ``(K, in, out)``."""
        if self.pad is not None:
            x = x.index_select(0, self.pad.to(x.device))
        blocks = x.reshape(self.blocks, -1, x.shape[-1])
        y = torch.bmm(blocks, weights) if bias is None else torch.baddbmm(bias, blocks, weights)
        y = y.reshape(*x.shape[:-1], weights.shape[-1])
        if self.unpad is not None:
            y = y.index_select(0, self.unpad.to(x.device))
        return y


def _total(runs: list[tuple[int, int, int]]) -> int:
    return runs[-1][2] if runs else 0


class _PerRowExperts(nn.Module):
    """Stands in for a submodule whose weights differ between experts: each row goes through
    its own expert's submodule.

    A linear layer (most of a transformer's weights, called several times per layer per
    step) keeps the experts' weights stacked as one ``(K, in, out)`` tensor -- the experts'
    own ``weight`` becomes a view into it, so nothing is held twice -- and runs as one
    ``bmm`` over equal blocks of rows (:class:`BlockLayout`): about the cost of the dense
    layer, where one call per expert and a concatenation cost two to three times as much on
    a small model. Other submodules, and batches that do not split into blocks, run each
    stretch of rows through its expert's ``forward`` and concatenate the outputs.
    """

    def __init__(
        self, tied: set[int], modules: dict[int, nn.Module], stacked: StackedExperts
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleDict({str(index): module for index, module in modules.items()})
        self._stacked = stacked
        self._weights: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        ordered = [modules[index] for index in sorted(modules)]
        if all(type(m) is nn.Linear and m.weight.data_ptr() not in tied for m in ordered):
            self._stack_linear(ordered)
        self._calls = {index: _direct_call(module) for index, module in modules.items()}

    def _stack_linear(self, linears: list[nn.Module]) -> None:
        layers: list[Any] = linears
        weights = torch.stack([m.weight.detach().t() for m in layers]).contiguous()
        for position, module in enumerate(layers):
            module.weight = nn.Parameter(weights[position].t(), requires_grad=False)
        self._weights = weights
        if all(m.bias is not None for m in layers):
            self._bias = torch.stack([m.bias.detach()[None] for m in layers]).contiguous()
        elif any(m.bias is not None for m in layers):
            self._weights = None  # some with a bias, some without: one call each

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = x.shape[0]
        runs = self._stacked.runs(rows)
        calls = self._calls
        if len(runs) == 1:
            return calls[runs[0][0]](x, *args, **kwargs)
        if self._weights is not None:
            layout = self._stacked.layout(rows)
            if layout is not None:
                return layout.linear(x, self._weights, self._bias)
        return torch.cat([calls[e](x[s:t], *args, **kwargs) for e, s, t in runs])


def _direct_call(module: nn.Module) -> Callable[..., torch.Tensor]:
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: torch.nn.functional.linear(x, weight, bias)
    forward: Callable[..., torch.Tensor] = module.forward
    return forward


def _repeated_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters that more than one module holds (tied embeddings)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return [(n, p) for n, p in model.named_parameters() if seen[id(p)] > 1]


def _config_key(model: nn.Module) -> str:
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _BOOKKEEPING_KEYS}
        return value

    config: Any = model.config
    return json.dumps(strip(config.to_dict()), sort_keys=True, default=str)


def _direct_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(recurse=False))
    tensors.update(module.named_buffers(recurse=False))
    return tensors


def _same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[n].shape == b[n].shape and a[n].dtype == b[n].dtype for n in a
    )


def _same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(a[n] is b[n] or torch.equal(a[n], b[n]) for n in a)


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The model's ``vision_tower`` submodule, or None for a text-only model.

    Stacking needs it to tell whether experts' own towers may run per row; the runtime, to
    hand the shared tower's pass to every expert's tower.
    """
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "vision_tower":
            return module
    return None
