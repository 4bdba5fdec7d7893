"""The supervisor around torchrun: two gloo ranks of the tiny LLaVA on CPU train the weights of
one process with the same global batch; rank 1 killed with -9 restarts the group from its
checkpoint; an input error names its rank and is not retried; stop() checkpoints every rank at
one step."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
from safetensors.torch import load_file
from training.synthetic import Shard

from protocol.exit_codes import ExitCode
from site_agent.supervisor import Supervisor, SupervisorConfig, TrainingCommand, TrainingFailed

pytestmark = pytest.mark.slow

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # same arithmetic in every run
CONFIG = SupervisorConfig(backoff_seconds=0.1, tick_seconds=0.2, stop_grace_seconds=60)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ranks")


def supervisor(
    tmp: Path,
    name: str,
    recipe: Path,
    shard: Shard,
    events: list[dict[str, Any]],
    processes: int = 2,
    manifest: Path | None = None,
) -> Supervisor:
    command = TrainingCommand(
        recipe=recipe,
        shard=manifest or shard.manifest,
        image_root=shard.image_root,
        output=tmp / name,
        processes=processes,
    )
    return Supervisor(command, CONFIG, on_event=events.append, env=ONE_THREAD)


def trained(tmp: Path, recipe: Path, shard: Shard, name: str, processes: int) -> list[dict]:
    events: list[dict[str, Any]] = []
    done = supervisor(tmp, name, recipe, shard, events, processes).run()
    assert done is not None and done["step"] == 24
    return events


def weights(run: Path) -> dict[str, Any]:
    return load_file(run / "model" / "model.safetensors")


def largest_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def rank_pid(supervisor: Supervisor, rank: int) -> int:
    """The pid of one rank, a child of the torchrun the supervisor started."""
    assert supervisor.pid is not None
    for child in psutil.Process(supervisor.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return int(child.pid)
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} under torchrun pid {supervisor.pid}")


@pytest.fixture(scope="module")
def two_ranks(tmp: Path, recipe: Path, shard: Shard) -> list[dict[str, Any]]:
    return trained(tmp, recipe, shard, "two-ranks", processes=2)


def test_two_gloo_ranks_train_the_weights_of_one_process(
    tmp: Path, recipe: Path, shard: Shard, two_ranks: list[dict[str, Any]]
) -> None:
    trained(tmp, recipe, shard, "one-process", processes=1)
    worst = largest_difference(weights(tmp / "one-process"), weights(tmp / "two-ranks"))
    assert worst < 1e-5, f"largest weight difference {worst}"

    # One progress stream (rank 0's): every step once.
    steps = [e["step"] for e in two_ranks if e["event"] == "progress"]
    assert steps == list(range(1, 25))
    assert len([e for e in two_ranks if e["event"] == "start"]) == 1
    run = json.loads((tmp / "two-ranks" / "run.json").read_text())
    assert run["launch"] == {"processes": 2, "nodes": 1, "devices": ["cpu", "cpu"], "gpus": []}
    assert run["schedule"]["world_size"] == 2
    assert run["schedule"]["per_device_batch_size"] == 2
    assert run["schedule"]["global_batch_size"] == 4
    assert run["data"]["images_verified"] == 24
    done = two_ranks[-1]
    assert (done["processes"], done["nodes"], done["gpus"]) == (2, 1, [])
    log = (tmp / "two-ranks" / "train.log").read_text()
    assert "torch.distributed.run --standalone" in log and "--nproc-per-node=2" in log


def test_kill_9_of_rank_1_restarts_the_group_and_ends_with_the_uninterrupted_weights(
    tmp: Path, recipe: Path, shard: Shard, two_ranks: list[dict[str, Any]]
) -> None:
    events: list[dict[str, Any]] = []
    killed: list[int] = []

    def kill_rank_1_after_step_12(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] == "progress" and event["step"] >= 12 and not killed:
            os.kill(rank_pid(run, 1), signal.SIGKILL)
            killed.append(event["step"])

    run = supervisor(tmp, "killed", recipe, shard, events)
    run._on_event = kill_rank_1_after_step_12
    done = run.run()
    assert done is not None and done["step"] == 24 and killed

    [restart] = [e for e in events if e["event"] == "restart"]
    assert restart["attempt"] == 2
    first, second = [e for e in events if e["event"] == "start"]
    assert first["resumed_from"] is None
    resumed_at = int(Path(second["resumed_from"]).name.removeprefix("checkpoint-"))
    assert resumed_at in (10, 15)
    after = events.index(second)
    resumed_steps = [e["step"] for e in events[after:] if e["event"] == "progress"]
    assert resumed_steps == list(range(resumed_at + 1, 25))
    worst = largest_difference(weights(tmp / "two-ranks"), weights(tmp / "killed"))
    assert worst < 1e-5, f"largest weight difference {worst}"


def test_an_input_error_on_the_ranks_fails_at_once_naming_the_rank(
    tmp: Path, recipe: Path, shard: Shard, tampered_manifest: Path
) -> None:
    events: list[dict[str, Any]] = []
    with pytest.raises(TrainingFailed) as failed:
        supervisor(tmp, "tampered-run", recipe, shard, events, manifest=tampered_manifest).run()
    error = failed.value
    assert error.exit_code == ExitCode.VERIFY_FAILED and error.child_exit_code == 8
    assert error.restarts == 0 and not [e for e in events if e["event"] == "restart"]
    message = str(error)
    # torchrun itself exits 1: the code and words come from the failing rank's error file.
    assert "exit code 8 (verify failed)" in message
    assert "trainer error: rank " in message and "img-000.png" in message
    assert "expected sha256 0000000000000000" in message


def test_stop_checkpoints_every_rank_at_the_same_step(
    tmp: Path, recipe: Path, shard: Shard
) -> None:
    events: list[dict[str, Any]] = []

    def stop_at_step_3(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] == "progress" and event["step"] == 3:
            run.stop()

    run = supervisor(tmp, "stopped", recipe, shard, events)
    run._on_event = stop_at_step_3
    assert run.run() is None
    stopped = events[-1]
    assert stopped["event"] == "stopped" and 3 <= stopped["step"] < 24
    checkpoint = Path(stopped["checkpoint"])
    assert (
        json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        == (stopped["step"])
    )
    # Each rank saved its own RNG state at that step: both stopped there.
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert not [e for e in events if e["event"] == "restart"]
