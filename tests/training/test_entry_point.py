"""The entry point's contract with the supervisor: pinned flags, JSON lines on standard output,
exit codes from protocol.exit_codes, and checkpoints cut short by a crash never resumed from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from protocol.exit_codes import ExitCode
from site_agent.training.__main__ import build_parser, main
from site_agent.training.trainer import last_complete_checkpoint

from .synthetic import Shard, write_recipe


def test_command_line_flags_are_pinned() -> None:
    # New settings belong in the recipe; a new flag here must be a deliberate decision.
    options = {o for action in build_parser()._actions for o in action.option_strings}
    assert options == {
        "-h", "--help", "--recipe", "--shard", "--image-root", "--output", "--base-model",
        "--resume", "--progress",
    }  # fmt: skip


def test_usage_error_is_exit_code_2() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--recipe", "r.yaml"])
    assert caught.value.code == ExitCode.USAGE


def test_errors_go_to_stdout_as_one_json_line_and_to_stderr_as_text(
    tmp_path: Path, shard: Shard, capfd: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path / "bad.yaml", {"training": {"learning_rate": "fast"}})
    stdout_before = sys.stdout
    code = main(
        ["--recipe", str(recipe), "--shard", str(shard.manifest), "--output", str(tmp_path / "o")]
    )
    assert code == ExitCode.BAD_INPUT
    assert sys.stdout is stdout_before
    out, err = capfd.readouterr()
    [line] = out.splitlines()
    event = json.loads(line)
    assert event["event"] == "error" and event["error"] == "InvalidArgument"
    assert event["exit_code"] == ExitCode.BAD_INPUT
    assert "training.learning_rate" in event["message"]
    assert "training.learning_rate" in err and "Traceback" not in err


def test_missing_shard_and_missing_base_model(tmp_path: Path, shard: Shard) -> None:
    recipe = write_recipe(tmp_path / "r.yaml")
    progress = tmp_path / "p.jsonl"
    common = ["--recipe", str(recipe), "--output", str(tmp_path / "o"), "--progress", str(progress)]
    assert main([*common, "--shard", str(tmp_path / "expert-9.json")]) == ExitCode.NOT_FOUND
    code = main(
        [*common, "--shard", str(shard.manifest), "--base-model", str(tmp_path / "nowhere")]
    )
    assert code == ExitCode.NOT_FOUND
    messages = [
        json.loads(line)["message"] for line in progress.read_text().splitlines() if "error" in line
    ]
    assert "expert-9.json: no such file" in messages[0]
    assert "nowhere" in messages[1] and "does not exist" in messages[1]


def test_image_problems_stop_before_training(tmp_path: Path, shard: Shard) -> None:
    recipe = write_recipe(tmp_path / "r.yaml")
    (shard.image_root / "img-007.png").write_bytes(b"tampered")
    progress = tmp_path / "p.jsonl"
    code = main(
        ["--recipe", str(recipe), "--shard", str(shard.manifest), "--image-root", str(shard.image_root),
         "--output", str(tmp_path / "o"), "--progress", str(progress)]
    )  # fmt: skip
    assert code == ExitCode.VERIFY_FAILED
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [e["event"] for e in events] == ["phase", "error"]
    assert "img-007.png" in events[-1]["message"] and "expected sha256" in events[-1]["message"]


def test_a_checkpoint_cut_short_is_removed_and_the_previous_one_used(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    for step in (5, 10):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text(
            json.dumps({"global_step": step})
        )
    torn = checkpoints / "checkpoint-15"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")
    (checkpoints / "checkpoint-20").mkdir()
    (checkpoints / "checkpoint-20" / "trainer_state.json").write_text('{"global_st')
    assert last_complete_checkpoint(checkpoints) == checkpoints / "checkpoint-10"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert last_complete_checkpoint(tmp_path / "absent") is None
