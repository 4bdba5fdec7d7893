"""Today's ``coordinator partition`` writes, byte for byte, the plan and shard manifests that
atoll wrote before the formats were typed (``golden/v0.1``), from the same inputs: the plan
digest, which every assignment and expert cites, does not move."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from partition.builders import conversation, llava_samples, make_images

from coordinator.federation import init_federation
from coordinator.partition import cli

GOLDEN = Path(__file__).parent / "golden" / "v0.1"
FILES = ["plan.json", "expert-0.json", "expert-1.json"]


def _partition(tmp_path: Path, dataset: Path, root: Path, *extra: str) -> Path:
    state = init_federation(tmp_path / "state", "golden")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--state", str(state.root), "--dataset", str(dataset), "--image-root", str(root),
         "--workers", "0", "--json", *extra]
    )  # fmt: skip
    assert cli.run(args) == 0
    return state.partition_dir


def test_llava_plan_is_written_as_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    images = make_images(root, 6, size=8)
    samples = llava_samples(images, text_only=2)
    samples.append(
        {"id": "pair", "image": [images[0], images[2]], "conversations": conversation("pair")}
    )
    (root / "llava.json").write_text(json.dumps(samples))
    folder = _partition(
        tmp_path, root / "llava.json", root, "--experts", "2", "--encoder",
        "open_clip:atoll-tiny-clip",
    )  # fmt: skip
    assert (
        json.loads(capsys.readouterr().out)["digest"]
        == json.loads((GOLDEN / "plan.json").read_text())["digest"]
    )
    for name in FILES:
        assert (folder / name).read_bytes() == (GOLDEN / name).read_bytes(), name


def test_text_only_plan_is_written_as_before(tmp_path: Path) -> None:
    samples = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": f"q {i}"},
                                          {"from": "gpt", "value": "a"}]}
        for i in range(3)
    ]  # fmt: skip
    (tmp_path / "text.json").write_text(json.dumps(samples))
    (tmp_path / "empty").mkdir()
    folder = _partition(
        tmp_path, tmp_path / "text.json", tmp_path / "empty", "--experts", "2", "--seed", "3"
    )
    for name in FILES:
        assert (folder / name).read_bytes() == (GOLDEN / "text-only" / name).read_bytes(), name
