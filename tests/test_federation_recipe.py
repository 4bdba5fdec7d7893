"""`coordinator recipe`: the recipe and base checkpoint every assignment names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from coordinator.federation_recipe import current_recipe, directory_digest, set_recipe
from protocol.errors import FailedPrecondition, InvalidArgument, NotFound

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.slow
def test_tiny_recipe_materialises_and_serves_its_base(running: Any, tmp_path: Path) -> None:
    state, store = running.state, running.coordinator.store
    described = set_recipe(state, store, CONFIGS / "tiny-cpu.yaml")
    assert described.base_model.served is True
    assert described.base_model.digest == directory_digest(state.root / "base")[0]
    names = {a.name for a in store.list_artifacts()}
    assert "recipe/recipe.yaml" in names and "base/config.json" in names
    assert any(n.startswith("base/") and n.endswith(".safetensors") for n in names)
    assert current_recipe(store) == described

    running.add_plan(1)
    store.set_meta("recipe", described.canonical())  # add_plan records a test recipe
    workdir = running.enrol(tmp_path, "alpha")
    with running.client(workdir) as client:
        reply = client.get_assignment()
    document = json.loads(reply.assignment_json)
    assert document["recipe"]["sha256"] == described.sha256
    assert document["base_model"]["digest"] == described.base_model.digest
    assert {"recipe/recipe.yaml", "base/config.json"} <= {a.name for a in reply.artifacts}

    # Once an expert is assigned, the recipe is fixed (the same one again is a no-op).
    assert set_recipe(state, store, CONFIGS / "tiny-cpu.yaml") == described
    other = tmp_path / "other.yaml"
    other.write_text((CONFIGS / "tiny-cpu.yaml").read_text().replace("seed: 42", "seed: 43"))
    with pytest.raises(FailedPrecondition, match="cannot change now"):
        set_recipe(state, store, other)


def test_pretrained_recipe_needs_a_base_directory(running: Any, tmp_path: Path) -> None:
    state, store = running.state, running.coordinator.store
    with pytest.raises(InvalidArgument, match="--base-model PATH is required"):
        set_recipe(state, store, CONFIGS / "llava-1.5-7b-lora.yaml")
    with pytest.raises(NotFound, match="not a directory"):
        set_recipe(state, store, CONFIGS / "llava-1.5-7b-lora.yaml", tmp_path / "missing")
    with pytest.raises(InvalidArgument, match="init-from-config"):
        set_recipe(state, store, CONFIGS / "tiny-cpu.yaml", tmp_path)
    assert current_recipe(store) is None


def test_pretrained_base_is_recorded_by_digest(running: Any, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"\0" * 1000)
    recipe_dir = tmp_path / "recipes"
    shutil.copytree(CONFIGS, recipe_dir)
    described = set_recipe(
        running.state, running.coordinator.store, recipe_dir / "llava-1.5-7b-lora.yaml", base
    )
    assert described.base_model.digest == directory_digest(base)[0]
    names = {a.name for a in running.coordinator.store.list_artifacts()}
    assert "recipe/deepspeed/zero3.json" in names  # the recipe's DeepSpeed config travels too


def test_bad_recipe_names_the_field(running: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "tiny-cpu.yaml").read_text().replace("epochs: 3", "epochz: 3"))
    with pytest.raises(InvalidArgument, match="epochz"):
        set_recipe(running.state, running.coordinator.store, bad)
    assert current_recipe(running.coordinator.store) is None
