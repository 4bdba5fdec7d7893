"""`site-agent join/train` launch flags: each bad value fails before anything is enrolled,
downloaded or started, with an error naming the flag and value (no training here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocol.errors import FailedPrecondition, InvalidArgument
from protocol.exit_codes import ExitCode
from site_agent.cli import main as site_agent_main
from site_agent.launch import LaunchSettings, SlurmSettings, local_processes, parse_gpus
from site_agent.slurm import check_shared_workdir, filesystem_type

JOIN = ["join", "--coordinator", "127.0.0.1:1", "--token", "atoll1.x.y"]


def join(tmp_path: Path, *flags: str) -> int:
    return site_agent_main([*JOIN, "--workdir", str(tmp_path / "site"), *flags])


@pytest.mark.parametrize(
    ("flags", "code", "words"),
    [
        (["--procs", "0"], ExitCode.BAD_INPUT, "--procs 0: expected at least 1 process"),
        (["--gpus", "0"], ExitCode.BAD_INPUT, "--gpus 0: expected at least 1 GPU"),
        (["--gpus", "many"], ExitCode.BAD_INPUT, "--gpus 'many': expected a number of GPUs"),
        (["--gpus", "1", "--procs", "2"], ExitCode.BAD_INPUT, "pass one of them"),
        (["--nodes", "2"], ExitCode.BAD_INPUT, "--nodes and --gpus-per-node are for --launcher"),
        (["--launcher", "slurm", "--nodes", "0"], ExitCode.BAD_INPUT, "--nodes 0: expected"),
        (["--launcher", "slurm", "--time", "soon"], ExitCode.BAD_INPUT, "--time 'soon'"),
        (["--launcher", "slurm", "--slurm-arg", "qos=high"], ExitCode.BAD_INPUT,
         "--slurm-arg 'qos=high': expected an sbatch option"),
        (["--launcher", "slurm", "--gpus", "2"], ExitCode.BAD_INPUT, "pass --gpus-per-node N"),
        (["--launcher", "slurm", "--slurm-template", "/nowhere.sbatch"], ExitCode.NOT_FOUND,
         "--slurm-template /nowhere.sbatch: no such file"),
    ],
)  # fmt: skip
def test_bad_launch_flags_fail_before_enrolling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], code: int, words: str
) -> None:
    assert join(tmp_path, *flags) == code
    assert words in capsys.readouterr().err
    assert not (tmp_path / "site").exists()  # nothing enrolled, nothing written


def test_more_gpus_than_visible_names_both_numbers() -> None:
    with pytest.raises(FailedPrecondition, match=r"--gpus 4: 2 CUDA device\(s\) visible"):
        local_processes(LaunchSettings(gpus=4), visible=2)
    with pytest.raises(FailedPrecondition, match=r"--gpus all: 0 CUDA device\(s\) visible"):
        local_processes(LaunchSettings(gpus="all"), visible=0)


def test_gpus_on_this_machine_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    visible = local_processes(LaunchSettings(gpus=None))  # every GPU here, or one CPU process
    asked = str(visible + 1) if visible > 0 else "1"
    assert join(tmp_path, "--gpus", asked) == ExitCode.PRECONDITION
    assert f"--gpus {asked}: " in capsys.readouterr().err


def test_how_many_ranks_start_here() -> None:
    assert local_processes(LaunchSettings(), visible=8) == 8
    assert local_processes(LaunchSettings(), visible=0) == 1
    assert local_processes(LaunchSettings(gpus="all"), visible=4) == 4
    assert local_processes(LaunchSettings(gpus=2), visible=4) == 2
    assert local_processes(LaunchSettings(procs=3), visible=4) == 3
    assert parse_gpus("all") == "all" and parse_gpus("3") == 3
    slurm = LaunchSettings(launcher="slurm", slurm=SlurmSettings(nodes=2, gpus_per_node=8))
    assert slurm.processes_per_node() == 8
    assert LaunchSettings(launcher="slurm", procs=2).processes_per_node() == 2
    with pytest.raises(InvalidArgument, match="--procs 2 and --gpus-per-node 4"):
        LaunchSettings(launcher="slurm", procs=2, slurm=SlurmSettings(gpus_per_node=4))


def test_slurm_without_sbatch_names_the_missing_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert join(tmp_path, "--launcher", "slurm", "--nodes", "1") == ExitCode.PRECONDITION
    err = capsys.readouterr().err
    assert "--launcher slurm: sbatch, srun, scontrol, scancel not found on PATH" in err
    assert str(empty) in err and not (tmp_path / "site").exists()


def test_a_node_local_workdir_is_refused_for_a_multi_node_job() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or filesystem_type(shm) != "tmpfs" or not os.access(shm, os.W_OK):
        pytest.skip("no writable tmpfs at /dev/shm on this machine")
    with pytest.raises(FailedPrecondition, match=r"--workdir /dev/shm is on tmpfs.*--nodes 2"):
        check_shared_workdir(shm, nodes=2)
    check_shared_workdir(shm, nodes=1)  # one node may be this machine: the job checks itself
