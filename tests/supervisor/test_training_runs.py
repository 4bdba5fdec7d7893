"""The supervisor around the real trainer: tiny LLaVA runs on CPU (tiny-cpu recipe, synthetic
shard), a kill -9 mid-run resumed to the same weights, bad input, stop()."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

# The training core's synthetic shard and recipe writers (tests/ is on sys.path under pytest).
from training.synthetic import Shard

from protocol.exit_codes import ExitCode
from site_agent.supervisor import Supervisor, SupervisorConfig, TrainingCommand, TrainingFailed
from site_agent.training.trainer import last_complete_checkpoint

pytestmark = pytest.mark.slow

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # same arithmetic in every run
CONFIG = SupervisorConfig(backoff_seconds=0.1, tick_seconds=0.2)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("supervised")


class Recorder:
    """Callbacks that record what the supervisor relays."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.ticks = 0

    def on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def on_tick(self) -> None:
        self.ticks += 1

    def steps(self, after: dict[str, Any] | None = None) -> list[int]:
        start = self.events.index(after) if after else 0
        return [e["step"] for e in self.events[start:] if e["event"] == "progress"]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def supervisor(
    tmp: Path,
    name: str,
    recipe: Path,
    shard: Shard,
    recorder: Recorder,
    manifest: Path | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> Supervisor:
    command = TrainingCommand(
        recipe=recipe,
        shard=manifest or shard.manifest,
        image_root=shard.image_root,
        output=tmp / name,
    )
    return Supervisor(
        command,
        CONFIG,
        on_event=on_event or recorder.on_event,
        on_tick=recorder.on_tick,
        env=ONE_THREAD,
    )


@pytest.fixture(scope="module")
def reference(tmp: Path, recipe: Path, shard: Shard) -> tuple[dict[str, Any], Recorder]:
    recorder = Recorder()
    done = supervisor(tmp, "reference", recipe, shard, recorder).run()
    assert done is not None
    return done, recorder


def test_a_supervised_run_completes_and_relays_progress(
    tmp: Path, reference: tuple[dict[str, Any], Recorder]
) -> None:
    done, recorder = reference
    assert done == recorder.events[-1]
    assert done["event"] == "done" and done["step"] == done["total_steps"] == 24
    assert Path(done["model_dir"]) == tmp / "reference" / "model"
    assert recorder.steps() == list(range(1, 25))
    progress = recorder.named("progress")[0]
    assert {"loss", "learning_rate", "tokens_per_second", "eta_seconds"} <= set(progress)
    assert [e["step"] for e in recorder.named("checkpoint")] == [5, 10, 15, 20, 24]
    assert not recorder.named("restart") and recorder.ticks > 0
    log = (tmp / "reference" / "train.log").read_text()
    assert log.count("--- supervisor: attempt ") == 1 and "--resume" in log


def test_kill_9_mid_run_is_restarted_and_ends_with_the_uninterrupted_weights(
    tmp: Path, recipe: Path, shard: Shard, reference: tuple[dict[str, Any], Recorder]
) -> None:
    recorder = Recorder()
    killed: list[int] = []

    def kill_after_step_12(event: dict[str, Any]) -> None:
        recorder.on_event(event)
        if event["event"] == "progress" and event["step"] >= 12 and not killed:
            pid = run.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed.append(event["step"])

    run = supervisor(tmp, "killed", recipe, shard, recorder, on_event=kill_after_step_12)
    done = run.run()
    assert done is not None and done["step"] == 24 and killed

    [restart] = recorder.named("restart")
    assert restart["exit_code"] == -signal.SIGKILL and restart["cause"] == "killed by SIGKILL"
    first, second = recorder.named("start")
    assert first["resumed_from"] is None
    resumed_at = int(Path(second["resumed_from"]).name.removeprefix("checkpoint-"))
    assert resumed_at in (10, 15)  # the newest checkpoint before the kill
    # The global step carries on from the checkpoint, without a gap or a repeat after it.
    assert recorder.steps(after=second) == list(range(resumed_at + 1, 25))
    assert (tmp / "killed" / "train.log").read_text().count("--- supervisor: attempt ") == 2

    expected = load_file(tmp / "reference" / "model" / "model.safetensors")
    actual = load_file(tmp / "killed" / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    worst = max(float((expected[k] - actual[k]).abs().max()) for k in expected)
    assert worst < 1e-5, f"largest weight difference {worst}"


def test_an_image_digest_mismatch_fails_at_once_with_the_log_tail(
    tmp: Path, recipe: Path, shard: Shard, tampered_manifest: Path
) -> None:
    recorder = Recorder()
    with pytest.raises(TrainingFailed) as failed:
        supervisor(tmp, "tampered-run", recipe, shard, recorder, tampered_manifest).run()
    error = failed.value
    assert error.exit_code == ExitCode.VERIFY_FAILED and error.child_exit_code == 8
    assert error.restarts == 0 and not recorder.named("restart")
    message = str(error)
    assert "exit code 8 (verify failed)" in message and "not restarted" in message
    # The trainer's own words, from train.log: which image, which digests.
    assert "img-000.png" in error.log_tail and "expected sha256 0000000000000000" in error.log_tail
    assert error.log_tail in message and "train.log" in message


def test_stop_checkpoints_and_returns_without_a_restart(
    tmp: Path, recipe: Path, shard: Shard
) -> None:
    recorder = Recorder()

    def stop_at_step_3(event: dict[str, Any]) -> None:
        recorder.on_event(event)
        if event["event"] == "progress" and event["step"] == 3:
            run.stop()

    run = supervisor(tmp, "stopped", recipe, shard, recorder, on_event=stop_at_step_3)
    assert run.run() is None
    assert run.pid is None and not recorder.named("restart")
    stopped = recorder.events[-1]
    assert stopped["event"] == "stopped" and 3 <= stopped["step"] < 24
    output = tmp / "stopped"
    assert last_complete_checkpoint(output / "checkpoints") == Path(stopped["checkpoint"])
    assert not (output / "model").exists()
    assert (output / "train.log").read_text().count("--- supervisor: attempt ") == 1
