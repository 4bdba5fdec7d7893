"""Fixtures: tiny generated image data sets in LLaVA and InternVL form, and a state dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.federation import init_federation
from coordinator.state import StateDir

from .builders import conversation, llava_samples, make_images


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return init_federation(tmp_path / "state", "test")


@pytest.fixture
def llava(tmp_path: Path) -> tuple[Path, Path]:
    """A LLaVA data set: 30 distinct images, one duplicate picture under a second path (and a
    second sample of it), a two-image sample, and 7 text-only samples."""
    root = tmp_path / "data"
    images = make_images(root, 30)
    (root / "img" / "copy-of-0003.png").write_bytes((root / images[3]).read_bytes())
    samples = llava_samples(images, text_only=7)
    samples.append(
        {"id": "dup-path", "image": "img/copy-of-0003.png", "conversations": conversation("copy")}
    )
    samples.append({"id": "again", "image": images[5], "conversations": conversation("again")})
    samples.append(
        {"id": "pair", "image": [images[7], images[8]], "conversations": conversation("pair")}
    )
    dataset = root / "llava.json"
    dataset.write_text(json.dumps(samples))
    return dataset, root
