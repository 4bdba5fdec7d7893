"""The supervisor's restart policy, callbacks and stop(), with small scripted children in place
of the trainer (each starts in a fraction of a second)."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from protocol.exit_codes import ExitCode
from site_agent.supervisor import (
    Supervisor,
    SupervisorConfig,
    TrainingCommand,
    TrainingFailed,
)

FAST = SupervisorConfig(backoff_seconds=0.01, tick_seconds=0.05)


def python(source: str) -> list[str]:
    """A child command running ``source`` (JSON lines to stdout, like the trainer)."""
    prelude = (
        "import json, os, signal, sys, time\nemit = lambda **e: print(json.dumps(e), flush=True)\n"
    )
    return [sys.executable, "-c", prelude + textwrap.dedent(source)]


def supervise(
    tmp_path: Path, source: str, config: SupervisorConfig = FAST, **kwargs: Any
) -> tuple[Supervisor, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    command = TrainingCommand(recipe=Path("r.yaml"), shard=Path("s.json"), output=tmp_path / "run")
    kwargs.setdefault("on_event", events.append)
    return Supervisor(command, config, argv=python(source), **kwargs), events


def attempts(supervisor: Supervisor) -> int:
    return supervisor.log_path.read_text().count("--- supervisor: attempt ")


@pytest.mark.parametrize(
    ("source", "exit_code", "cause"),
    [
        ("print('boom: CUDA error', file=sys.stderr); sys.exit(1)", 1, "error"),
        ("print('boom: out of memory', file=sys.stderr, flush=True); os.kill(os.getpid(), 9)",
         -9, "killed by SIGKILL"),
    ],
)  # fmt: skip
def test_crashes_are_retried_a_bounded_number_of_times(
    tmp_path: Path, source: str, exit_code: int, cause: str
) -> None:
    config = SupervisorConfig(max_restarts=2, backoff_seconds=0.01, tick_seconds=0.05)
    supervisor, events = supervise(tmp_path, source, config)
    with pytest.raises(TrainingFailed) as failed:
        supervisor.run()
    error = failed.value
    assert attempts(supervisor) == 3
    assert [e["attempt"] for e in events if e["event"] == "restart"] == [2, 3]
    assert [e["restarts_left"] for e in events if e["event"] == "restart"] == [1, 0]
    assert error.child_exit_code == exit_code and error.restarts == 2
    assert error.exit_code == ExitCode.ERROR
    message = str(error)
    assert f"exit code {exit_code}, {cause}" in message
    assert "gave up after 2 restarts" in message and "supervisor.max_restarts" in message
    assert "boom:" in message and str(supervisor.log_path) in message


def test_input_errors_are_not_retried(tmp_path: Path) -> None:
    source = """
        emit(event="error", error="VerificationFailed", message="image x: expected sha256 ab..", exit_code=8)
        print("site_agent.training: image x: expected sha256 ab..", file=sys.stderr)
        sys.exit(8)
    """
    supervisor, events = supervise(tmp_path, source)
    with pytest.raises(TrainingFailed) as failed:
        supervisor.run()
    assert attempts(supervisor) == 1 and not [e for e in events if e["event"] == "restart"]
    assert failed.value.exit_code == ExitCode.VERIFY_FAILED and failed.value.restarts == 0
    assert "exit code 8 (verify failed)" in str(failed.value)
    assert "trainer error: image x: expected sha256" in str(failed.value)


def test_a_crash_after_a_new_checkpoint_starts_the_count_again(tmp_path: Path) -> None:
    # Each attempt saves one more checkpoint, then crashes; the fifth finishes. One restart in a
    # row is allowed, yet the run gets through four crashes: each one came after progress.
    source = f"""
        counter = {str(tmp_path / "attempts")!r}
        n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
        open(counter, "w").write(str(n))
        emit(event="checkpoint", step=10 * n, path="checkpoint")
        if n < 5:
            sys.exit(1)
        emit(event="done", step=50, total_steps=50, model_dir="model")
    """
    config = SupervisorConfig(max_restarts=1, backoff_seconds=0.01, tick_seconds=0.05)
    supervisor, events = supervise(tmp_path, source, config)
    done = supervisor.run()
    assert done is not None and done["step"] == 50
    assert [e["attempt"] for e in events if e["event"] == "restart"] == [2, 3, 4, 5]
    assert [e["restarts_left"] for e in events if e["event"] == "restart"] == [0, 0, 0, 0]


def test_exit_0_without_done_is_a_crash(tmp_path: Path) -> None:
    supervisor, _ = supervise(tmp_path, "emit(event='progress', step=1)", FAST)
    with pytest.raises(TrainingFailed, match="exited without reporting done"):
        supervisor.run()
    assert attempts(supervisor) == FAST.max_restarts + 1


def test_ticks_go_on_while_the_child_is_silent_and_a_slow_tick_never_blocks_it(
    tmp_path: Path,
) -> None:
    # The child writes far more than a pipe holds (64 KiB) while the first tick blocks for a
    # second: it must finish in the meantime, its lines queued for the caller.
    finished = tmp_path / "child-finished"
    source = f"""
        for step in range(20000):
            emit(event="progress", step=step, padding="x" * 40)
        open({str(finished)!r}, "w").write(repr(time.time()))
        time.sleep(1.5)  # silent, after the slow first tick
        emit(event="done", step=20000)
    """
    ticks: list[float] = []

    def slow_tick() -> None:
        if not ticks:
            time.sleep(1.0)
        ticks.append(time.time())

    config = SupervisorConfig(tick_seconds=0.05)
    supervisor, events = supervise(tmp_path, source, config, on_tick=slow_tick)
    done = supervisor.run()
    assert done is not None and done["step"] == 20000
    assert float(finished.read_text()) < ticks[0]
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(20000))
    assert len(ticks) >= 5  # also while the child is silent


def test_stop_during_the_backoff_returns_at_once(tmp_path: Path) -> None:
    config = SupervisorConfig(backoff_seconds=60, tick_seconds=0.05)

    def stop_on_restart(event: dict[str, Any]) -> None:
        if event["event"] == "restart":
            supervisor.stop()

    supervisor, _ = supervise(tmp_path, "sys.exit(1)", config, on_event=stop_on_restart)
    started = time.monotonic()
    assert supervisor.run() is None
    assert time.monotonic() - started < 10
    assert attempts(supervisor) == 1


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace_period(tmp_path: Path) -> None:
    source = """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        emit(event="start", resumed_from=None)
        time.sleep(60)
    """
    config = SupervisorConfig(stop_grace_seconds=0.5, tick_seconds=0.05)

    def stop_at_start(event: dict[str, Any]) -> None:
        supervisor.stop()

    supervisor, _ = supervise(tmp_path, source, config, on_event=stop_at_start)
    started = time.monotonic()
    assert supervisor.run() is None
    assert time.monotonic() - started < 10
    assert attempts(supervisor) == 1 and supervisor.pid is None


def test_settings_are_validated_by_name() -> None:
    with pytest.raises(Exception, match=r"supervisor.max_restarts must be at least 0, got -1"):
        SupervisorConfig(max_restarts=-1)
    with pytest.raises(Exception, match=r"supervisor.tick_seconds must be positive"):
        SupervisorConfig(tick_seconds=0)


def test_backoff_grows_to_its_maximum() -> None:
    config = SupervisorConfig(backoff_seconds=10, backoff_factor=2, max_backoff_seconds=35)
    assert [config.backoff(n) for n in (1, 2, 3, 4)] == [10, 20, 35, 35]


def test_the_child_command_resumes_and_names_every_file(tmp_path: Path) -> None:
    command = TrainingCommand(
        recipe=Path("r.yaml"),
        shard=Path("expert-3.json"),
        output=Path("run"),
        image_root=Path("images"),
        base_model=Path("base"),
    )
    assert command.argv() == [
        sys.executable, "-m", "site_agent.training", "--recipe", "r.yaml",
        "--shard", "expert-3.json", "--image-root", "images", "--output", "run",
        "--base-model", "base", "--resume", "--progress", "-",
    ]  # fmt: skip
