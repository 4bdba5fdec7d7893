"""Builders for tiny generated data sets (images are small PNGs with random content)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


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
