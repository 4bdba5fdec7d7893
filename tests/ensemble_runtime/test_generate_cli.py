"""``atoll generate``'s implementation: flags pinned, an answer printed, bad input named."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ensemble import generate_cli
from protocol.errors import InvalidArgument

from .builders import picture


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="atoll generate")
    generate_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_are_pinned() -> None:
    parser = argparse.ArgumentParser()
    generate_cli.add_arguments(parser)
    flags = {o for action in parser._actions for o in action.option_strings}
    assert flags == {
        "-h", "--help", "--ensemble", "--image", "--prompt", "--top-k", "--text-only",
        "--max-new-tokens", "--sample", "--temperature", "--seed", "--device", "--no-verify",
        "--json",
    }  # fmt: skip


def test_generate_prints_the_answer_and_routing(
    ensemble_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "blue.png"
    picture("blue-circle", 1).save(image)
    common = ["--ensemble", str(ensemble_dir), "--max-new-tokens", "4", "--device", "cpu"]
    args = _parse(*common, "--image", str(image), "--prompt", "What is it?", "--json")
    assert generate_cli.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["experts"] == [1] and report["final_posterior"] is None
    args = _parse(*common, "--prompt", "Hi", "--text-only", "uniform", "--top-k", "2")
    assert generate_cli.run(args) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_undecodable_image(ensemble_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    args = _parse("--ensemble", str(ensemble_dir), "--image", str(bad), "--prompt", "x")
    with pytest.raises(InvalidArgument, match=r"bad\.jpg: cannot decode it"):
        generate_cli.run(args)
