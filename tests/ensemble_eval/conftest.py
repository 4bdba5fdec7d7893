"""Fixtures: the tiny K=2 ensemble of tests/ensemble_runtime (expert 0 owns the red squares,
expert 1 the blue circles) and a benchmark file over its pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ensemble_runtime.builders import build_ensemble, write_pictures
from ensemble_runtime.conftest import one_torch_thread

__all__ = ["one_torch_thread"]  # the same one-thread rule for tiny models, package-wide


@pytest.fixture(scope="package")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ensemble(tmp_path_factory.mktemp("ensemble") / "ensemble")


@pytest.fixture(scope="package")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data file, image root): two questions per picture kind and one text-only question."""
    root = tmp_path_factory.mktemp("bench")
    files = write_pictures(root / "images", per_kind=2)
    samples = []
    for kind, paths in files.items():
        for number, path in enumerate(paths):
            samples.append(
                {
                    "id": f"{kind}-{number}",
                    "image": path.relative_to(root / "images").as_posix(),
                    "benchmark": "shapes",
                    "task": kind,
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat shape is this?"},
                        {"from": "gpt", "value": kind.split("-")[1]},
                    ],
                }
            )
    samples.append(
        {
            "id": "text-0",
            "benchmark": "text",
            "conversations": [
                {"from": "human", "value": "Say yes."},
                {"from": "gpt", "value": "yes"},
            ],
            "answers": ["yes", "Yes."],
        }
    )
    data = root / "eval.json"
    data.write_text(json.dumps(samples))
    return data, root / "images"
