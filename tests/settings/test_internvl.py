"""Settings 2, 3, 5 and 6 of the paper, InternVL experts fine-tuned in full, through the real
commands:

* §5.2 with a plan from precomputed features (settings 2 and 5): K = 2, a separate open_clip
  router shaped as CLIP-B/16 (patch 16; tiny width), its features computed "elsewhere" by
  ``coordinator features``, the .npz naming its encoder, partition spot-checking them;
* the ablations (settings 3 and 6): K = 4 with two-stage partitioning, from InternVL's meta
  format (JSONL annotations per data set, ``repeat_time``); a bad ``repeat_time`` is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.ensemble_manifest import load_manifest
from protocol.exit_codes import ExitCode

from .harness import Federation, evaluate, generate, tiny_recipe

# A federation per module: its set-up (training included) counts toward the first test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
ROUTER = "open_clip:atoll-tiny-vit-b-16"


def _meta(data: Path, repeat_time: Any = 2) -> Path:
    """The training set in InternVL's meta format: one JSONL annotation per data set, image
    paths relative to each data set's root; charts repeated ``repeat_time`` times."""
    samples = json.loads((data / "train.json").read_text())
    by_set: dict[str, list[dict[str, Any]]] = {"shapes": [], "charts": [], "sums": []}
    for sample in samples:
        name = sample["image"].split("/", 1)[0] if "image" in sample else "sums"
        record = dict(sample)
        if "image" in record:
            record["image"] = record["image"].split("/", 1)[1]
        by_set[name].append(record)
    meta = {}
    for name, records in by_set.items():
        annotation = data / f"{name}.jsonl"
        annotation.write_text("".join(json.dumps(r) + "\n" for r in records))
        meta[name] = {"root": name if name != "sums" else ".", "annotation": annotation.name,
                      "repeat_time": repeat_time if name == "charts" else 1,
                      "length": len(records)}  # fmt: skip
    path = data / f"meta-{repeat_time}.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def _plan(federation: Federation) -> dict[str, Any]:
    return dict(json.loads((federation.state / "partition" / "plan.json").read_text()))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_recipe(tmp_path_factory.mktemp("recipe") / "internvl.yaml", "internvl")


@pytest.fixture(scope="module")
def from_features(
    tmp_path_factory: pytest.TempPathFactory, data: Path, recipe: Path
) -> Iterator[tuple[Federation, Path]]:
    federation = Federation(tmp_path_factory.mktemp("internvl-features") / "federation", "ivl")
    federation.set_up(recipe)
    features = federation.root / "features.npz"
    try:
        federation.run("coordinator", "features", "--dataset", str(data / "train.json"),
                       "--image-root", str(data / "images"), "--encoder", ROUTER,
                       "--out", str(features), "--device", "cpu", "--workers", "0", "--json")  # fmt: skip
        federation.partition("--dataset", str(data / "train.json"), "--image-root",
                             str(data / "images"), "--experts", "2", "--features", str(features))  # fmt: skip
        federation.train(2, data / "images")
        _, ensemble = federation.publish("--tau", "20")
        yield federation, ensemble
    finally:
        federation.stop()


@pytest.fixture(scope="module")
def two_stage(
    tmp_path_factory: pytest.TempPathFactory, data: Path, recipe: Path
) -> Iterator[tuple[Federation, Path]]:
    federation = Federation(tmp_path_factory.mktemp("internvl-k4") / "federation", "ivl-k4")
    federation.set_up(recipe)
    try:
        federation.partition("--dataset", str(_meta(data)), "--image-root", str(data / "images"),
                             "--experts", "4", "--algorithm", "two-stage", "--fine-clusters",
                             "8", "--encoder", ROUTER)  # fmt: skip
        federation.train(4, data / "images")
        _, ensemble = federation.publish()
        yield federation, ensemble
    finally:
        federation.stop()


def test_internvl_from_precomputed_features_with_a_separate_router(
    from_features: tuple[Federation, Path], data: Path
) -> None:
    federation, ensemble = from_features
    plan = _plan(federation)
    assert plan["encoder_spec"] == ROUTER and plan["encoder"]["backend"] == "open_clip"
    assert plan["features"]["file"] == "features.npz"
    assert plan["features"]["checked"]["images"] == 16  # recomputed here, and they agree
    manifest = load_manifest(ensemble)
    assert manifest.architecture == "internvl" and manifest.base is None
    assert [e.kind for e in manifest.experts] == ["full", "full"]
    assert manifest.router.encoder.model == "atoll-tiny-vit-b-16"
    assert manifest.router.encoder.identity == plan["encoder"]
    picture = data / "images" / "charts" / "eval-0001.png"
    answer = generate(federation, ensemble, "--image", str(picture), "--prompt",
                      "How many bars does the chart have?", "--top-k", "2")  # fmt: skip
    assert sorted(answer["experts"]) == [0, 1] and sum(answer["weights"]) == pytest.approx(1)
    report = evaluate(federation, ensemble, data, "--top-k", "2")
    systems = {system for group in report["groups"] for system in group["scores"]}
    assert systems == {"ensemble top-1", "ensemble top-2"}


def test_internvl_k4_two_stage_from_the_meta_format(
    two_stage: tuple[Federation, Path], data: Path
) -> None:
    federation, ensemble = two_stage
    plan = _plan(federation)
    assert plan["dataset"]["format"] == "internvl" and plan["num_experts"] == 4
    assert plan["algorithm"]["name"] == "two-stage" and plan["algorithm"]["fine_clusters"] == 8
    images = [c["unique_images"] for c in plan["clusters"]]
    assert images == [6, 6, 6, 6]  # 24 pictures, balanced
    shard = json.loads((federation.state / "partition" / "expert-0.json").read_text())
    assert shard["datasets"]["charts"]["repeat_time"] == 2
    manifest = load_manifest(ensemble)
    assert manifest.num_experts == 4 and manifest.present_experts == [0, 1, 2, 3]
    answer = generate(federation, ensemble, "--image", str(data / "images" / "shapes" /
                      "eval-0000.png"), "--prompt", "What colour are the shapes?")  # fmt: skip
    assert len(answer["experts"]) == 1
    report = evaluate(federation, ensemble, data)
    assert sum(g["n"] for g in report["groups"] if g["task"] == "all") == 17


def test_a_bad_repeat_time_is_refused(two_stage: tuple[Federation, Path], data: Path) -> None:
    federation, _ = two_stage
    before = _plan(federation)["digest"]
    error = federation.coordinator(
        "partition", "--dataset", str(_meta(data, repeat_time=0)), "--image-root",
        str(data / "images"), "--experts", "4", "--encoder", ROUTER, expect=ExitCode.BAD_INPUT,
    )  # fmt: skip
    assert "'charts': repeat_time: expected a number > 0, got 0" in error
    assert _plan(federation)["digest"] == before  # the plan in place is untouched
