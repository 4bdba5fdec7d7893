"""Inputs shared by the supervisor's end-to-end tests: one synthetic shard and recipe (read
only). Trainers there run one torch thread each: as fast as it gets on a shared 2-core machine,
and the same arithmetic in every run, so weights compare exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training.synthetic import Shard, write_recipe, write_shard


@pytest.fixture(scope="package")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("supervisor-inputs")


@pytest.fixture(scope="package")
def shard(inputs: Path) -> Shard:
    return write_shard(inputs / "shard")


@pytest.fixture(scope="package")
def recipe(inputs: Path) -> Path:
    # 24 steps (32 samples, K = 2, dense global batch 8, 3 epochs), a checkpoint every 5: one
    # process takes 4 samples a step, two ranks 2 each.
    return write_recipe(inputs / "recipe.yaml", {"training": {"save_steps": 5}})


@pytest.fixture(scope="package")
def tampered_manifest(inputs: Path, shard: Shard) -> Path:
    """The shard's manifest with a wrong digest for img-000.png (an input error)."""
    document = json.loads(shard.manifest.read_text())
    document["samples"][0]["image_sha256"] = "0" * 64
    manifest = inputs / "tampered" / "expert-0.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps(document))
    return manifest
