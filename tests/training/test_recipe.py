"""Recipes: the shipped configs validate and carry the paper's settings; bad recipes are
rejected naming the setting; match-dense-steps keeps the dense number of optimizer steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from protocol.errors import InvalidArgument, NotFound
from protocol.recipe import (
    Architecture,
    BaseSource,
    ScheduleMode,
    TrainingSettings,
    load_recipe,
    parse_recipe,
)
from site_agent.training.schedule import plan_schedule

from .synthetic import REPO, write_recipe

CONFIGS = REPO / "configs"


@pytest.mark.parametrize(
    "name", ["tiny-cpu", "llava-1.5-7b-lora", "internvl2.5-1b-full", "causal-lm"]
)
def test_shipped_recipes_validate(name: str) -> None:
    recipe, digest = load_recipe(CONFIGS / f"{name}.yaml")
    assert recipe.name == name
    assert len(digest) == 64
    if recipe.training.deepspeed:
        assert (CONFIGS / recipe.training.deepspeed).is_file()


def test_llava_recipe_has_the_llava_1_5_visual_instruction_tuning_settings() -> None:
    recipe, _ = load_recipe(CONFIGS / "llava-1.5-7b-lora.yaml")
    assert recipe.model.architecture is Architecture.LLAVA
    assert recipe.model.base is BaseSource.PRETRAINED
    assert recipe.model.freeze.vision_tower and not recipe.model.freeze.projector
    assert recipe.model.lora is not None
    assert (recipe.model.lora.r, recipe.model.lora.alpha) == (128, 256)
    training = recipe.training
    assert training.learning_rate == 2e-4 and training.projector_learning_rate == 2e-5
    assert (training.global_batch_size, training.epochs) == (128, 1)
    assert (training.lr_scheduler, training.warmup_ratio) == ("cosine", 0.03)
    assert training.schedule is ScheduleMode.MATCH_DENSE_STEPS
    assert training.scale == "per-device-batch"
    assert recipe.data.max_length == 2048
    assert training.precision == "bf16"


def test_internvl_recipe_is_full_fine_tuning_at_8192_without_dynamic_resolution() -> None:
    recipe, _ = load_recipe(CONFIGS / "internvl2.5-1b-full.yaml")
    assert recipe.model.architecture is Architecture.INTERNVL
    assert recipe.model.lora is None
    assert not any(dict(recipe.model.freeze).values())
    assert recipe.data.max_length == 8192 and not recipe.data.dynamic_resolution
    assert recipe.training.per_device_batch_size == 1
    assert recipe.training.scale == "gradient-accumulation"


def test_unknown_key_is_rejected_with_its_path(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", {"training": {"learnig_rate": 1e-3}})
    with pytest.raises(InvalidArgument, match=r"training\.learnig_rate: unknown key") as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)


def test_wrong_type_is_rejected_with_its_path_and_value(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", {"training": {"learning_rate": "fast"}})
    with pytest.raises(InvalidArgument, match=r"training\.learning_rate: .*got 'fast'"):
        load_recipe(path)


def test_nested_wrong_type_and_bad_enum(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path / "r.yaml", {"model": {"architecture": "gpt5", "tiny": {"num_layers": "two"}}}
    )
    with pytest.raises(InvalidArgument) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert "model.architecture" in message and "'gpt5'" in message
    assert "model.tiny.num_layers" in message


def test_missing_required_setting_and_non_mapping() -> None:
    with pytest.raises(InvalidArgument, match=r"model: required"):
        parse_recipe({"name": "x"})
    with pytest.raises(InvalidArgument, match="expected a mapping"):
        parse_recipe(["not", "a", "mapping"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(InvalidArgument, match="not valid YAML"):
        load_recipe(bad)


def test_tiny_dimensions_are_checked(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", {"model": {"tiny": {"hidden_size": 66}}})
    with pytest.raises(InvalidArgument, match="multiple of num_heads"):
        load_recipe(path)


def _dense(**changes: object) -> TrainingSettings:
    return TrainingSettings.model_validate(
        {"global_batch_size": 128, "per_device_batch_size": 16, **changes}
    )


def test_llava_k2_on_the_dense_devices_halves_the_per_device_batch() -> None:
    # LLaVA-1.5's 665k samples over K = 2 experts on the dense run's 8 GPUs.
    schedule = plan_schedule(
        _dense(), shard_samples=332_500, num_experts=2, world_size=8, dense_samples=665_000
    )
    assert schedule.dense_steps == math.ceil(665_000 / 128)
    assert schedule.total_steps == schedule.dense_steps
    assert (schedule.per_device_batch_size, schedule.gradient_accumulation_steps) == (8, 1)
    assert schedule.global_batch_size == 64
    assert schedule.dense_samples_source == "manifest"


def test_fewer_devices_accumulate_rather_than_exceed_the_per_device_batch() -> None:
    schedule = plan_schedule(_dense(), shard_samples=332_500, num_experts=2, world_size=1)
    assert schedule.per_device_batch_size <= 16
    assert schedule.global_batch_size == 64
    assert schedule.dense_samples_source == "K x shard"


def test_internvl_k2_halves_the_gradient_accumulation() -> None:
    settings = _dense(
        per_device_batch_size=1, gradient_accumulation_steps=64, scale="gradient-accumulation"
    )
    dense = plan_schedule(settings, shard_samples=100_000, num_experts=1, world_size=2)
    expert = plan_schedule(settings, shard_samples=50_000, num_experts=2, world_size=2)
    assert dense.gradient_accumulation_steps == 64
    assert expert.gradient_accumulation_steps == 32
    assert expert.per_device_batch_size == 1
    assert expert.total_steps == dense.total_steps


def test_unbalanced_shards_keep_the_dense_step_count() -> None:
    # Balanced k-means balances images, not image-text pairs: shards differ a little in size.
    small = plan_schedule(
        _dense(), shard_samples=300_000, num_experts=2, world_size=8, dense_samples=665_000
    )
    large = plan_schedule(
        _dense(), shard_samples=365_000, num_experts=2, world_size=8, dense_samples=665_000
    )
    assert small.total_steps == large.total_steps
    assert small.global_batch_size < large.global_batch_size
    assert small.epochs == pytest.approx(1.0, abs=0.1) and large.epochs == pytest.approx(
        1.0, abs=0.1
    )


def test_as_given_and_max_steps_override() -> None:
    given = plan_schedule(
        _dense(schedule="as-given", per_device_batch_size=4, gradient_accumulation_steps=2),
        shard_samples=100,
        num_experts=2,
    )
    assert (given.global_batch_size, given.total_steps, given.dense_steps) == (8, 13, None)
    capped = plan_schedule(_dense(max_steps=7), shard_samples=100, num_experts=2)
    assert capped.total_steps == 7 and capped.max_steps_override


def test_empty_shard_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="no usable training samples"):
        plan_schedule(_dense(), shard_samples=0, num_experts=2)
