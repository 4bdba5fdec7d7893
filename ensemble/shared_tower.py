"""The router's CLIP encoder when it is the experts' own vision tower.

When the router's encoder is a Hugging Face CLIP whose vision model is the LLaVA experts'
own tower (same settings, weights and preprocessing), one tower pass per batch gives both the
routing features (its projected pooled output) and the experts' image features (its hidden
layer). :class:`SharedTower` finds that case and, while the experts generate, makes their
towers hand the routing pass's output back instead of running again.

It sees the runtime only through two narrow interfaces (:class:`ExpertTowers`,
:class:`HandedOutputs`), so this module does not import :mod:`ensemble.runtime`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from ensemble.scheduling import slices
from protocol.ensemble_manifest import EnsembleManifest

__all__ = ["ExpertTowers", "HandedOutputs", "SharedTower", "take_rows"]


class ExpertTowers(Protocol):
    """The present experts, as far as a shared tower needs them."""

    def engines(self) -> list[nn.Module]:
        """Every distinct model that can run."""
        ...

    def vision_towers(self) -> list[nn.Module]:
        """Every distinct vision tower those models run."""
        ...


class HandedOutputs(Protocol):
    """A batch that remembers which pixels it selected from the routing pass."""

    def handed_output(self, pixels: torch.Tensor) -> Any:
        """The routing pass's tower output for ``pixels``, or None."""
        ...


def take_rows(output: Any, rows: torch.Tensor) -> Any:
    """A vision tower output restricted to ``rows`` (hidden states it did not keep stay None)."""
    return _combined([output], lambda tensors: tensors[0][rows])


def _combined(outputs: list[Any], combine: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    """One vision tower output whose every tensor is ``combine`` of the outputs' tensors."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    def field(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        present = [t for t in tensors if t is not None]
        return combine(present) if len(present) == len(tensors) else None

    first = outputs[0].hidden_states
    hidden = None
    if first is not None:
        layers = [output.hidden_states for output in outputs]
        hidden = tuple(field([layer[i] for layer in layers]) for i in range(len(first)))
    return BaseModelOutputWithPooling(
        last_hidden_state=field([output.last_hidden_state for output in outputs]),
        pooler_output=field([output.pooler_output for output in outputs]),
        hidden_states=hidden,
    )


# What a vision tower computes: the settings that must agree for two towers to be one model
# (their weights are compared too).
_TOWER_SETTINGS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


class SharedTower:
    """The router's encoder is the experts' own CLIP vision tower: one pass serves both.

    It holds when the plan's encoder is a Hugging Face CLIP whose vision model has the
    experts' tower's settings and weights and whose image preprocessing gives the same
    pixels. The router needs CLIP's image embedding, ``visual_projection(pooler_output)``
    (the pooled output is the post-layernorm CLS token of the last layer); LLaVA needs
    ``hidden_states[vision_feature_layer]`` of the same pass. So the pass runs the tower as
    LLaVA runs it, the router projects its pooled output (a ``D x H`` matmul), and while the
    experts generate, their towers hand that output back instead of running again.
    """

    def __init__(self, towers: list[nn.Module], projection: nn.Module, feature_layer: Any) -> None:
        self.towers = towers
        self.projection = projection
        self.feature_layer = feature_layer

    @classmethod
    def find(
        cls, feature_model: Any, experts: ExpertTowers, processor: Any, manifest: EnsembleManifest
    ) -> SharedTower | None:
        """The shared tower, or None when the router's encoder is another model."""
        return cls.check(feature_model, experts, processor, manifest)[0]

    @classmethod
    def check(
        cls, feature_model: Any, experts: ExpertTowers, processor: Any, manifest: EnsembleManifest
    ) -> tuple[SharedTower | None, str]:
        """The shared tower and why, or None and why not (checked, never assumed: settings,
        every weight, and the pixels of a probe image)."""
        clip = getattr(feature_model, "clip", None)
        if clip is None:
            return None, "the router's encoder is not a Hugging Face CLIP"
        if manifest.architecture != "llava":
            return None, f"the experts are {manifest.architecture}, not LLaVA with a CLIP tower"
        towers = experts.vision_towers()
        if not towers:
            return None, "the experts have no vision tower"
        vision = clip.vision_model  # a CLIPVisionModel, the class of LLaVA's vision tower
        reference = vision.state_dict()
        for tower in towers:
            if type(tower) is not type(vision):
                return None, f"the experts' tower is a {type(tower).__name__}, not CLIP's"
            for name in _TOWER_SETTINGS:
                ours, theirs = getattr(vision.config, name), getattr(tower.config, name, None)
                if ours != theirs:
                    return None, f"vision setting {name}: router {ours!r}, experts {theirs!r}"
            weights = tower.state_dict()
            if weights.keys() != reference.keys():
                return None, "the towers' weights have different names"
            for n in weights:
                mine = reference[n].to(weights[n].device)
                if (
                    weights[n].dtype != mine.dtype
                    or weights[n].shape != mine.shape
                    or not torch.equal(weights[n], mine)
                ):
                    return None, f"weight {n} differs between the router's CLIP and the experts"
        probe = Image.radial_gradient("L").convert("RGB").resize((97, 61))
        ours = processor.image_processor(images=[probe], return_tensors="pt")["pixel_values"]
        theirs = feature_model.pixels([probe]).cpu()
        if ours.shape != theirs.shape or not torch.equal(ours.float(), theirs.float()):
            return None, "the router's image preprocessing gives other pixels than the experts'"
        layers = {json.dumps(_config_of(e).vision_feature_layer) for e in experts.engines()}
        if len(layers) != 1:
            return None, f"the experts read different tower layers ({sorted(layers)})"
        shared = cls(towers, clip.visual_projection, json.loads(layers.pop()))
        return shared, "same CLIP weights, settings and preprocessing: one tower pass per batch"

    def encode(
        self, pixels: torch.Tensor, batch_size: int | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Unit-norm router features and the tower's output (as LLaVA asks for it), the
        tower running ``batch_size`` images at a time (default: all at once)."""
        with torch.inference_mode():
            outputs = [
                self.towers[0](
                    pixels[part], output_hidden_states=self.feature_layer, return_dict=True
                )
                for part in slices(len(pixels), batch_size)
            ]
            output = outputs[0] if len(outputs) == 1 else _combined(outputs, torch.cat)
            weight = self.projection.weight
            pooled = output.pooler_output.to(weight.device, weight.dtype)
            features = self.projection(pooled).float()
        return torch.nn.functional.normalize(features, dim=-1), output

    @contextlib.contextmanager
    def handing(self, batch: HandedOutputs) -> Iterator[None]:
        """Makes every expert tower return ``batch``'s routing pass for pixels it selected."""

        def forward_of(tower: nn.Module) -> Callable[..., Any]:
            real = type(tower).forward

            def forward(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                handed = None
                if not args and kwargs.get("output_hidden_states") == self.feature_layer:
                    handed = batch.handed_output(pixel_values)
                if handed is None:
                    return real(tower, pixel_values, *args, **kwargs)
                return handed

            return forward

        for tower in self.towers:
            tower.forward = forward_of(tower)
        try:
            yield
        finally:
            for tower in self.towers:
                del tower.forward


def _config_of(model: nn.Module) -> Any:
    return model.config
