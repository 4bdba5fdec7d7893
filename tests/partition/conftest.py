"""Fixtures: tiny generated image data sets in LLaVA and InternVL form, and a state dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from coordinator.federation import init_federation
from coordinator.state import StateDir


def make_images(root: Path, count: int, seed: int = 0, size: int = 24) -> list[str]:
    """``count`` small PNGs with distinct random content; returns their relative paths."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        # Two colour families, so the features have some structure to find.
        base = np.array([200, 40, 40]) if i % 2 else np.array([40, 40, 200])
        pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        name = f"img/{i:04d}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
        names.append(name)
    return names


def conversation(text: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{text}?"}, {"from": "gpt", "value": text}]


def llava_samples(images: list[str], text_only: int = 0) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = [
        {"id": f"s{i}", "image": image, "conversations": conversation(f"picture {i}")}
        for i, image in enumerate(images)
    ]
    for j in range(text_only):
        samples.append(
            {
                "id": f"t{j}",
                "conversations": [
                    {"from": "human", "value": f"question {j}"},
                    {"from": "gpt", "value": "answer " * (j % 5 + 1)},
                ],
            }
        )
    return samples


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
    samples.append({"id": "dup-path", "image": "img/copy-of-0003.png", "conversations": conversation("copy")})
    samples.append({"id": "again", "image": images[5], "conversations": conversation("again")})
    samples.append({"id": "pair", "image": [images[7], images[8]], "conversations": conversation("pair")})
    dataset = root / "llava.json"
    dataset.write_text(json.dumps(samples))
    return dataset, root
