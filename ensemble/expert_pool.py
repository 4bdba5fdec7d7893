"""The present experts of an ensemble and the model calls that run a batch through them.

:class:`ExpertPool` loads the experts a manifest lists as present -- full models side by side,
or one base with a peft adapter per expert -- and turns rows grouped by expert into as few
model calls (:class:`Unit`) as the experts allow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensemble.stacked_experts import StackedExperts, runs, vision_tower
from protocol.ensemble_manifest import EnsembleManifest
from protocol.errors import InvalidArgument, NotFound

__all__ = ["ExpertPool", "Unit", "check_one_vocabulary"]


def _model_class(architecture: str) -> Any:
    from transformers import (
        AutoModelForCausalLM,
        InternVLForConditionalGeneration,
        LlavaForConditionalGeneration,
    )

    return {
        "llava": LlavaForConditionalGeneration,
        "internvl": InternVLForConditionalGeneration,
        "causal-lm": AutoModelForCausalLM,
    }[architecture]


class ExpertPool:
    """The present experts: full models side by side, or one base with a peft adapter each.

    :meth:`units` is how a batch runs: rows grouped by expert become as few model calls as the
    experts allow -- one call for LoRA adapters over one base (peft picks each row's adapter)
    and for full experts of one architecture
    (:class:`~ensemble.stacked_experts.StackedExperts`), one call per expert otherwise.
    """

    def __init__(
        self,
        models: dict[int, nn.Module],
        adapters: nn.Module | None,
        stacked: StackedExperts | None = None,
    ) -> None:
        self._models = models
        self._adapters = adapters
        # peft's per-row adapters (adapter_names) support only some layer types; a projector
        # trained in full beside the adapter (modules_to_save, LLaVA's recipe) is not one.
        self._per_row_adapters = adapters is not None and _per_row_adapters(adapters)
        self.stacked = stacked

    @classmethod
    def load(
        cls, directory: Path, manifest: EnsembleManifest, device: torch.device, dtype: Any
    ) -> ExpertPool:
        loader = _model_class(manifest.architecture)
        lora = [e for e in manifest.experts if e.present and e.kind == "lora"]
        full = [e for e in manifest.experts if e.present and e.kind == "full"]
        for expert in lora + full:
            if not (directory / expert.path).is_dir():
                raise NotFound(
                    f"experts[{expert.index}]: {expert.path} is not in {directory} (the "
                    "manifest says it is present; copy the whole ensemble directory again)"
                )
        models: dict[int, nn.Module] = {}
        for expert in full:
            models[expert.index] = _load_model(loader, directory / expert.path, dtype, device)
        adapters: nn.Module | None = None
        if lora:
            from peft import PeftModel

            assert manifest.base is not None  # the manifest validator guarantees it
            base = _load_model(loader, directory / manifest.base.path, dtype, device)
            # One base in memory; each adapter is a few MB, chosen per row (adapter_names).
            first, *rest = lora
            peft_model = PeftModel.from_pretrained(
                base, directory / first.path, adapter_name=_adapter(first.index)
            )
            for expert in rest:
                peft_model.load_adapter(
                    directory / expert.path, adapter_name=_adapter(expert.index)
                )
            adapters = peft_model.to(device).eval()
            for expert in lora:
                models[expert.index] = adapters
        stacked = None
        if len(full) > 1 and not lora:
            stacked = StackedExperts.build(
                {e.index: models[e.index] for e in full}, manifest.architecture
            )
        return cls(models, adapters, stacked)

    def model(self, index: int) -> nn.Module:
        """Expert ``index``, ready to run (its adapter active, for LoRA experts)."""
        model = self._models[index]
        if model is self._adapters:
            model.set_adapter(_adapter(index))  # type: ignore[operator]
        return model

    def engines(self) -> list[nn.Module]:
        """Every distinct model a unit can run (the peft model once, the stacked model)."""
        engines = {id(model): model for model in self._models.values()}
        if self.stacked is not None:
            engines[id(self.stacked.model)] = self.stacked.model
        return list(engines.values())

    def vision_towers(self) -> list[nn.Module]:
        """Every distinct vision tower a unit can run (empty for text-only experts)."""
        towers: dict[int, nn.Module] = {}
        for engine in self.engines():
            tower = vision_tower(engine)
            if tower is not None:
                towers[id(tower)] = tower
        return list(towers.values())

    def units(self, row_experts: Sequence[int], image_rows: Sequence[bool]) -> list[Unit]:
        """Model calls that together run every row through its own expert.

        Args:
            row_experts: Each row's expert; rows of one expert must be adjacent.
            image_rows: Whether each row has an image (its ``pixel_values`` row).
        """
        row_runs = runs(row_experts)
        if len({expert for expert, _, _ in row_runs}) != len(row_runs):
            raise ValueError(f"rows must be grouped by expert, got {list(row_experts)}")
        everyone = {expert for expert, _, _ in row_runs}
        images = [e for e, has in zip(row_experts, image_rows, strict=True) if has]
        if self._adapters is not None and all(self._models[e] is self._adapters for e in everyone):
            if len(everyone) == 1:
                # One adapter: peft's plain forward adds it to the base's output, without the
                # per-adapter row gathers and scatters that adapter_names costs every layer.
                (expert,) = everyone
                return [Unit(self._adapters, 0, len(row_experts), {}, adapter=_adapter(expert))]
            if self._per_row_adapters:
                names = [_adapter(e) for e in row_experts]
                return [Unit(self._adapters, 0, len(row_experts), {"adapter_names": names})]
        if self.stacked is not None and everyone <= self.stacked.experts and len(row_runs) > 1:
            return [
                Unit(self.stacked.model, 0, len(row_experts), {}, self.stacked, row_runs, images)
            ]
        units = []
        for expert, start, end in row_runs:
            model = self._models[expert]
            adapter = _adapter(expert) if model is self._adapters else None
            units.append(Unit(model, start, end, {}, adapter=adapter))
        return units

    def vocab_size(self, index: int) -> int:
        config: Any = self._models[index].config
        text = config.get_text_config()
        return int(text.vocab_size)


@dataclass
class Unit:
    """One model call over rows ``[start, end)`` of a batch, each row through its own expert."""

    model: nn.Module
    start: int
    end: int
    kwargs: dict[str, Any]
    stacked: StackedExperts | None = None
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    image_experts: list[int] = field(default_factory=list)
    adapter: str | None = None

    def __call__(self, method: str, /, **inputs: Any) -> Any:
        """``model.<method>(**inputs)``, with this unit's rows assigned to their experts."""
        if self.stacked is not None:
            self.stacked.assign(self.runs, runs(self.image_experts))
        model: Any = self.model
        if self.adapter is not None and model.active_adapter != self.adapter:
            model.set_adapter(self.adapter)
        return getattr(self.model, method)(**inputs, **self.kwargs)


def _adapter(index: int) -> str:
    return f"expert-{index}"


def _per_row_adapters(model: nn.Module) -> bool:
    from peft.utils.other import ModulesToSaveWrapper

    supported = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return all(
        isinstance(module.original_module, supported)
        for module in model.modules()
        if isinstance(module, ModulesToSaveWrapper)
    )


def _load_model(loader: Any, path: Path, dtype: Any, device: torch.device) -> nn.Module:
    try:
        model: nn.Module = loader.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidArgument(f"{path}: does not load as a model ({error})") from None
    return model.to(device).eval()


def check_one_vocabulary(manifest: EnsembleManifest, experts: ExpertPool) -> None:
    """Mixing adds up probabilities of the same token id: every expert needs one vocabulary."""
    sizes = {index: experts.vocab_size(index) for index in manifest.present_experts}
    if len(set(sizes.values())) > 1:
        raise InvalidArgument(
            f"experts: their vocabularies differ in size ({sizes}); an "
            "ensemble needs experts fine-tuned from one base"
        )
    tokenizers = {
        e.index: e.files["tokenizer.json"].sha256
        for e in manifest.experts
        if e.present and "tokenizer.json" in e.files
    }
    if len(set(tokenizers.values())) > 1:
        raise InvalidArgument(
            f"experts: their tokenizer.json files differ (experts {sorted(tokenizers)}); an "
            "ensemble needs experts fine-tuned from one base"
        )
