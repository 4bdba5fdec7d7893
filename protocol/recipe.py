"""The training recipe: one YAML file, validated once into typed settings.

Every component of the training core receives one of the sections below and never parses YAML
itself. Unknown keys and wrong types are rejected here, with the dotted path of the setting to
change (``training.learning_rate: expected a number, got 'fast'``).
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocol.errors import InvalidArgument, NotFound
from protocol.validation import describe_errors

__all__ = [
    "Architecture",
    "BaseSource",
    "DataSettings",
    "FreezeSettings",
    "LoraSettings",
    "ModelSettings",
    "Recipe",
    "ScheduleMode",
    "TinyModelSize",
    "TrainingSettings",
    "load_recipe",
    "parse_recipe",
]


class _Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(StrEnum):
    """Model families the training core knows how to build, feed and freeze."""

    LLAVA = "llava"  # LlavaForConditionalGeneration: CLIP tower + MLP projector + Llama
    INTERNVL = "internvl"  # InternVLForConditionalGeneration: InternViT + MLP + Qwen2
    CAUSAL_LM = "causal-lm"  # AutoModelForCausalLM: text-only experts (the c-BTM case)


class BaseSource(StrEnum):
    """Where the shared base checkpoint comes from."""

    # A tiny randomly initialised model built from `model.tiny` and `model.init_seed`:
    # every site that builds it gets the same weights, so no download is ever needed.
    INIT_FROM_CONFIG = "init-from-config"
    # A Hugging Face directory on the site's own disk (`--base-model PATH`).
    PRETRAINED = "pretrained"


class ScheduleMode(StrEnum):
    """How the per-device batch and gradient accumulation are chosen."""

    # The paper's compute matching: each expert, trained on ~1/K of the data, takes as many
    # optimizer steps as the dense run over all the data would, by shrinking its global batch.
    MATCH_DENSE_STEPS = "match-dense-steps"
    # Use per_device_batch_size and gradient_accumulation_steps exactly as written.
    AS_GIVEN = "as-given"


class TinyModelSize(_Strict):
    """Dimensions of a tiny model built from config (tests, demos, the tiny-cpu federation)."""

    hidden_size: int = Field(default=64, ge=8)
    intermediate_size: int = Field(default=128, ge=8)
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=4, ge=1)
    num_key_value_heads: int = Field(default=2, ge=1)
    vision_hidden_size: int = Field(default=32, ge=8)
    vision_intermediate_size: int = Field(default=64, ge=8)
    vision_num_layers: int = Field(default=2, ge=1)
    vision_num_heads: int = Field(default=2, ge=1)
    image_size: int = Field(default=32, ge=8)
    patch_size: int = Field(default=8, ge=1)
    max_position_embeddings: int = Field(default=1024, ge=16)

    @model_validator(mode="after")
    def _divisible(self) -> TinyModelSize:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_key_value_heads:
            raise ValueError("num_heads must be a multiple of num_key_value_heads")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError("vision_hidden_size must be a multiple of vision_num_heads")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        return self


class FreezeSettings(_Strict):
    """Which parts of the model keep their base weights."""

    vision_tower: bool = False
    projector: bool = False
    language_model: bool = False


class LoraSettings(_Strict):
    """Low-rank adapters on the language model's linear layers (peft)."""

    r: int = Field(ge=1)
    alpha: int = Field(ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    # A regex over module names, or a list of module-name suffixes; None picks every attention
    # and MLP projection of the language model (LLaVA's choice), never the vision tower.
    target_modules: str | list[str] | None = None


class ModelSettings(_Strict):
    """What to build and which parameters train."""

    architecture: Architecture
    base: BaseSource
    init_seed: int = 0
    tiny: TinyModelSize | None = None  # None with init-from-config: TinyModelSize's defaults
    freeze: FreezeSettings = FreezeSettings()
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _tiny_only_from_config(self) -> ModelSettings:
        if self.base is BaseSource.PRETRAINED and self.tiny is not None:
            raise ValueError("tiny: only meaningful with base: init-from-config")
        return self


class DataSettings(_Strict):
    """How conversations become token ids."""

    max_length: int = Field(default=2048, ge=8)
    # InternVL tiles large images into up to 12 crops; the paper turns that off for speed.
    dynamic_resolution: bool = False
    verify_workers: int = Field(default=8, ge=1)


class TrainingSettings(_Strict):
    """Optimisation and schedule, in the dense run's terms when `schedule` is match-dense-steps."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    schedule: ScheduleMode = ScheduleMode.MATCH_DENSE_STEPS
    # The dense baseline's global batch; match-dense-steps derives the expert's from it.
    global_batch_size: int = Field(default=128, ge=1)
    per_device_batch_size: int = Field(default=16, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    # Which knob match-dense-steps turns: LLaVA halves the per-device batch (never above
    # per_device_batch_size; accumulation covers a site with fewer devices), InternVL
    # (per-device batch 1) halves the gradient accumulation.
    scale: Literal["per-device-batch", "gradient-accumulation"] = "per-device-batch"
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)  # overrides the schedule (smoke runs only)
    learning_rate: float = Field(default=2e-5, gt=0)
    projector_learning_rate: float | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    seed: int = 42
    save_steps: int = Field(default=500, ge=1)
    keep_last_checkpoints: int = Field(default=2, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    dataloader_num_workers: int = Field(default=0, ge=0)
    # A DeepSpeed JSON, relative to the recipe file; used on CUDA only.
    deepspeed: str | None = None
    max_shard_size: str = "5GB"


class Recipe(_Strict):
    """A whole training recipe (one YAML file in ``configs/``)."""

    name: str = Field(min_length=1)
    model: ModelSettings
    data: DataSettings = DataSettings()
    training: TrainingSettings = TrainingSettings()


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validates an already-parsed YAML/JSON value into a :class:`Recipe`.

    Args:
        data: The mapping read from the recipe file.
        source: What to call the input in error messages (usually the file name).

    Raises:
        InvalidArgument: naming every setting to change, by its dotted path.
    """
    if not isinstance(data, dict):
        raise InvalidArgument(
            f"{source}: expected a mapping of settings, got {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data, strict=False)
    except ValidationError as error:
        raise InvalidArgument(f"{source}: {describe_errors(error)}") from None


def load_recipe(path: Path) -> tuple[Recipe, str]:
    """Reads and validates a recipe file.

    Returns:
        The recipe and the sha256 of the file's bytes (what the coordinator records).

    Raises:
        NotFound: the file does not exist.
        InvalidArgument: the file is not YAML, or a setting is unknown or of the wrong type.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"recipe {path}: no such file") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise InvalidArgument(f"recipe {path}: not valid YAML ({error})") from None
    return parse_recipe(data, source=f"recipe {path}"), hashlib.sha256(raw).hexdigest()
