"""The trainer as a Slurm job on the session's one-node cluster: `site-agent join --launcher
slurm` to an accepted expert; a job requeued mid-run (as a preemption does) resumes from the
checkpoint its ranks saved; a job cancelled with scancel stops for good, reported; a run
directory a node cannot read fails the job's own check."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from training.synthetic import Shard, write_recipe, write_shard

from coordinator.federation_recipe import set_recipe
from protocol.exit_codes import ExitCode
from site_agent.cli import main as site_agent_main
from site_agent.launch import LaunchSettings, SlurmSettings, TrainingCommand
from site_agent.slurm import SlurmLauncher
from site_agent.supervisor import Supervisor, SupervisorConfig, TrainingFailed

from .conftest import SlurmCluster

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
pytestmark = pytest.mark.slow
CONFIG = SupervisorConfig(backoff_seconds=0.5, tick_seconds=0.5, stop_grace_seconds=60)
TWO_RANKS = LaunchSettings(launcher="slurm", procs=2, slurm=SlurmSettings(nodes=1))


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Shard:
    return write_shard(tmp_path_factory.mktemp("slurm-shard"))


def supervisor(
    tmp_path: Path,
    shard: Shard,
    events: list[dict[str, Any]],
    settings: LaunchSettings = TWO_RANKS,
    epochs: int = 3,
) -> Supervisor:
    recipe = write_recipe(
        tmp_path / "recipe.yaml", {"training": {"save_steps": 5, "epochs": epochs}}
    )
    command = TrainingCommand(
        recipe=recipe, shard=shard.manifest, image_root=shard.image_root, output=tmp_path / "run"
    )
    launcher = SlurmLauncher(command, settings, CONFIG.stop_grace_seconds, poll_seconds=0.5)
    return Supervisor(command, CONFIG, on_event=events.append, launcher=launcher)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


def test_join_through_slurm_to_an_accepted_expert(
    slurm_cluster: SlurmCluster, running: Any, tmp_path: Path
) -> None:
    data = write_shard(tmp_path / "data", image_samples=8, text_samples=4, num_experts=1)
    running.add_plan(1, {"expert-0.json": data.manifest.read_bytes()})
    set_recipe(running.state, running.coordinator.store, CONFIGS / "tiny-cpu.yaml")
    workdir = tmp_path / "site"
    code = site_agent_main(
        ["join", "--coordinator", running.address, "--enrol-address", running.enrol_address,
         "--token", running.invite("alpha"), "--workdir", str(workdir),
         "--image-root", str(data.image_root),
         "--launcher", "slurm", "--nodes", "1", "--procs", "2"]
    )  # fmt: skip
    log = (workdir / "run" / "train.log").read_text()
    assert code == 0, log[-3000:]
    assert json.loads((workdir / "agent.json").read_text())["phase"] == "done"
    [upload] = [p.name for p in running.state.uploads_dir.iterdir()]
    assert running.coordinator.store.get_upload(upload).state == "accepted"
    run = json.loads((workdir / "run" / "run.json").read_text())
    assert run["launch"]["processes"] == 2 and run["launch"]["nodes"] == 1
    assert run["schedule"]["world_size"] == 2
    # Submitted with sbatch, run by srun + torchrun (c10d rendezvous) on the node.
    assert "sbatch --parsable --nodes=1" in log and "atoll-train: job " in log
    job = json.loads((workdir / "run" / "slurm-job.json").read_text())["job_id"]
    assert slurm_cluster.job(job)["JobState"] == "COMPLETED"


def test_a_requeued_job_resumes_from_the_checkpoint_its_ranks_saved(
    slurm_cluster: SlurmCluster, shard: Shard, tmp_path: Path
) -> None:
    events: list[dict[str, Any]] = []
    requeued: list[int] = []

    def requeue_at_step_10(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] == "progress" and event["step"] >= 10 and not requeued:
            job = run.pid
            assert job is not None
            slurm_cluster.scontrol("requeue", str(job))
            requeued.append(job)
        elif event["event"] == "job" and event["state"] == "PENDING" and event["restarts"]:
            # Slurm holds a requeued job back for two minutes; the admin lets it start now.
            slurm_cluster.scontrol("update", f"JobId={event['job_id']}", "StartTime=now")

    run = supervisor(tmp_path, shard, events, epochs=10)  # 80 steps
    run._on_event = requeue_at_step_10
    done = run.run()
    assert done is not None and done["step"] == done["total_steps"] == 80 and requeued

    [stopped] = named(events, "stopped")  # SIGTERM: every rank saved this step
    first, second = named(events, "start")
    assert first["resumed_from"] is None
    assert second["resumed_from"] == stopped["checkpoint"]
    after = events.index(second)
    steps = [e["step"] for e in events[after:] if e["event"] == "progress"]
    assert steps == list(range(stopped["step"] + 1, 81))
    # The same job all along, run twice; no resubmission by the agent.
    assert {e["job_id"] for e in named(events, "job")} == set(requeued)
    assert max(e["restarts"] for e in named(events, "job")) == 1
    assert not named(events, "restart")


def test_a_job_cancelled_with_scancel_is_reported_and_not_resubmitted(
    slurm_cluster: SlurmCluster, shard: Shard, tmp_path: Path
) -> None:
    events: list[dict[str, Any]] = []
    cancelled: list[int] = []

    def scancel_at_step_5(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] == "progress" and event["step"] >= 5 and not cancelled:
            assert run.pid is not None
            subprocess.run(["scancel", str(run.pid)], check=True, timeout=60)
            cancelled.append(run.pid)

    run = supervisor(tmp_path, shard, events, epochs=10)
    run._on_event = scancel_at_step_5
    with pytest.raises(TrainingFailed) as failed:
        run.run()
    error = failed.value
    assert error.exit_code == ExitCode.PRECONDITION and error.restarts == 0
    message = str(error)
    assert f"Slurm job {cancelled[0]} was cancelled (scancel" in message
    assert "not resubmitted" in message
    assert slurm_cluster.job(cancelled[0])["JobState"] == "CANCELLED"
    assert not named(events, "restart")
    # Nothing lost: the ranks checkpointed on scancel's SIGTERM.
    [stopped] = named(events, "stopped")
    assert Path(stopped["checkpoint"], "trainer_state.json").is_file()


def test_a_run_directory_a_node_cannot_read_fails_the_job_check(
    slurm_cluster: SlurmCluster, shard: Shard, tmp_path: Path
) -> None:
    events: list[dict[str, Any]] = []
    held = LaunchSettings(
        launcher="slurm", procs=2, slurm=SlurmSettings(nodes=1, extra_args=("--hold",))
    )

    def hide_the_token_then_release(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] == "job" and event["state"] == "PENDING":
            # What a node without the shared file system sees: no token where the agent wrote it.
            (tmp_path / "run" / "shared-check").write_text("another machine's file\n")
            slurm_cluster.scontrol("release", str(event["job_id"]))

    run = supervisor(tmp_path, shard, events, held)
    run._on_event = hide_the_token_then_release
    with pytest.raises(TrainingFailed) as failed:
        run.run()
    error = failed.value
    assert error.exit_code == ExitCode.PRECONDITION and error.restarts == 0
    assert f"atoll: node {slurm_cluster.node} cannot read" in str(error)
    assert "put --workdir on storage every compute node mounts" in str(error)
    assert not named(events, "start")  # the trainer never started


def test_a_restarted_agent_follows_its_job_instead_of_submitting_another(
    slurm_cluster: SlurmCluster, shard: Shard, tmp_path: Path
) -> None:
    held = LaunchSettings(
        launcher="slurm", procs=2, slurm=SlurmSettings(nodes=1, extra_args=("--hold",))
    )
    recipe = write_recipe(tmp_path / "recipe.yaml")
    command = TrainingCommand(
        recipe=recipe, shard=shard.manifest, image_root=shard.image_root, output=tmp_path / "run"
    )
    log = tmp_path / "train.log"
    with log.open("a") as handle:
        first = SlurmLauncher(command, held, poll_seconds=0.5).start(1, handle)
        # The agent on the login node is restarted while its job waits in the queue.
        again = SlurmLauncher(command, held, poll_seconds=0.5).start(1, handle)
    try:
        assert again.job_id == first.job_id
        assert f"following Slurm job {first.job_id} again" in log.read_text()
        assert log.read_text().count("sbatch --parsable") == 1
    finally:
        first.kill()
    assert first.wait(timeout=60) != 0 and slurm_cluster.job(first.job_id)["JobState"] == (
        "CANCELLED"
    )
