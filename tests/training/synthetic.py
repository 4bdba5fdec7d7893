"""Synthetic inputs for the training core: shards (images drawn with PIL), recipes derived from
``configs/tiny-cpu.yaml``, and a way to run the entry point and read its progress lines.

Everything is tiny (hidden size 64, 2 layers, 32x32 images) and built from config: no hub
downloads, CPU only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "configs" / "tiny-cpu.yaml"
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 40, 220),
    "yellow": (235, 220, 30),
}
SHAPES = ("square", "circle")


@dataclass(frozen=True)
class Shard:
    """A synthetic shard on disk."""

    manifest: Path
    image_root: Path
    samples: list[dict[str, Any]]


def _draw(path: Path, colour: str, shape: str, size: int = 40) -> None:
    picture = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(picture)
    box = (6, 6, size - 6, size - 6)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.ellipse(box, fill=COLOURS[colour])
    picture.save(path)


def write_shard(
    directory: Path,
    *,
    image_samples: int = 24,
    text_samples: int = 8,
    num_experts: int | None = 2,
    seed: int = 0,
) -> Shard:
    """Writes ``expert-0.json`` and its images: colour/shape questions plus text-only chats."""
    rng = random.Random(seed)
    image_root = directory / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, Any]] = []
    for index in range(image_samples):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        relative = f"img-{index:03d}.png"
        _draw(image_root / relative, colour, shape)
        digest = hashlib.sha256((image_root / relative).read_bytes()).hexdigest()
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": f"It is {colour}."},
        ]
        if index % 3 == 0:
            turns += [
                {"from": "human", "value": "And its form?"},
                {"from": "gpt", "value": f"A {shape}."},
            ]
        samples.append(
            {
                "id": f"img-{index}",
                "image": relative,
                "image_sha256": digest,
                "conversations": turns,
            }
        )
    for index in range(text_samples):
        word = rng.choice(["hello", "thanks", "goodbye"])
        samples.append(
            {
                "id": f"text-{index}",
                "conversations": [
                    {"from": "human", "value": f"Say {word}."},
                    {"from": "gpt", "value": f"{word.capitalize()}!"},
                ],
            }
        )
    document: dict[str, Any] = {"expert": 0, "samples": samples}
    if num_experts is not None:
        document["num_experts"] = num_experts
    manifest = directory / "expert-0.json"
    manifest.write_text(json.dumps(document, indent=1))
    return Shard(manifest=manifest, image_root=image_root, samples=samples)


def write_text_shard(directory: Path, samples: int = 32, num_experts: int = 2) -> Shard:
    """A text-only shard for a causal LM: plain documents and chats."""
    rng = random.Random(1)
    directory.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for index in range(samples):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if index % 2:
            records.append({"id": f"doc-{index}", "text": f"{a} plus {b} is {a + b}."})
        else:
            records.append(
                {
                    "id": f"chat-{index}",
                    "conversations": [
                        {"from": "human", "value": f"What is {a} plus {b}?"},
                        {"from": "gpt", "value": f"{a + b}."},
                    ],
                }
            )
    manifest = directory / "expert-0.json"
    manifest.write_text(json.dumps({"expert": 0, "num_experts": num_experts, "samples": records}))
    return Shard(manifest=manifest, image_root=directory, samples=records)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_recipe(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """``configs/tiny-cpu.yaml`` with ``overrides`` merged in (nested mappings merge)."""
    recipe = _merge(yaml.safe_load(TINY_RECIPE.read_text()), overrides or {})
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON progress lines written so far (a torn last line is skipped)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def run_entry_point(arguments: list[str], progress: Path) -> tuple[int, list[dict[str, Any]]]:
    """Runs ``python -m site_agent.training`` in this process; returns (exit code, events)."""
    from site_agent.training.__main__ import main

    code = main([*arguments, "--progress", str(progress)])
    return code, read_events(progress)
