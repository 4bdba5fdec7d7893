"""How a site runs its trainer: how many ranks, on this machine or as a Slurm job.

``site-agent join`` / ``train`` turn their flags into one :class:`LaunchSettings`, checked
here once, before anything is downloaded or started:

* on this machine (``--launcher local``, the default): ``--gpus N|all`` ranks, one per CUDA
  device (default: every visible device, or one CPU process when there is none), or
  ``--procs N`` gloo processes on CPU (CPU-only machines, tests);
* on a Slurm cluster (``--launcher slurm --nodes M``): the same trainer as a batch job, torchrun
  on every node (see :mod:`site_agent.slurm`), ``--gpus-per-node N`` or ``--procs N`` ranks per
  node (default 1).

Example::

    settings = LaunchSettings(gpus="all")
    processes = local_processes(settings)   # 8 on an 8-GPU node
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from protocol.errors import FailedPrecondition, InvalidArgument
from protocol.exit_codes import ExitCode

__all__ = [
    "LAUNCHER_ERROR_NAME",
    "LaunchSettings",
    "SlurmSettings",
    "TrainingCommand",
    "launcher_argv",
    "local_processes",
    "parse_gpus",
    "rank_failure",
    "visible_cuda_devices",
]

Gpus = int | Literal["all"]
# torchrun's own error file (TORCHELASTIC_ERROR_FILE) in the run directory.
LAUNCHER_ERROR_NAME = "launcher-error.json"
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


@dataclass(frozen=True)
class SlurmSettings:
    """The Slurm job's resources (flags of the same names; sbatch's own meaning).

    Attributes:
        nodes: Nodes of the job (``--nodes``); torchrun runs once on each.
        gpus_per_node: GPUs asked per node (``--gpus-per-node``), one rank each.
        partition: ``--partition``, or the cluster's default.
        time: ``--time`` limit (``HH:MM:SS``, ``D-HH:MM:SS``...); the agent resubmits after it.
        account: ``--account`` to charge.
        extra_args: Further sbatch arguments (``--slurm-arg=--qos=high``), passed as given.
        template: The batch script (default ``deploy/slurm/atoll-train.sbatch``).
    """

    nodes: int = 1
    gpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    extra_args: tuple[str, ...] = ()
    template: Path | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise InvalidArgument(f"--nodes {self.nodes}: expected at least 1 node")
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise InvalidArgument(
                f"--gpus-per-node {self.gpus_per_node}: expected at least 1 (for CPU ranks "
                "use --procs N)"
            )
        if self.time is not None and not _TIME.match(self.time):
            raise InvalidArgument(
                f"--time {self.time!r}: expected a Slurm time limit such as 04:00:00 or 2-00:00:00"
            )
        for argument in self.extra_args:
            if not argument.startswith("-"):
                raise InvalidArgument(
                    f"--slurm-arg {argument!r}: expected an sbatch option such as --qos=high"
                )


@dataclass(frozen=True)
class LaunchSettings:
    """How many ranks train, and where.

    Attributes:
        gpus: ``--gpus``: a number of CUDA devices, ``"all"``, or None (the default: all).
        procs: ``--procs``: CPU processes (gloo) instead of one per GPU.
        launcher: ``local`` (this machine) or ``slurm`` (a batch job).
        slurm: The job's resources, with ``launcher='slurm'``.
    """

    gpus: Gpus | None = None
    procs: int | None = None
    launcher: Literal["local", "slurm"] = "local"
    slurm: SlurmSettings = field(default_factory=SlurmSettings)

    def __post_init__(self) -> None:
        if self.procs is not None and self.procs < 1:
            raise InvalidArgument(f"--procs {self.procs}: expected at least 1 process")
        if self.procs is not None and self.gpus is not None:
            raise InvalidArgument(
                f"--procs {self.procs} and --gpus {self.gpus}: pass one of them (--procs "
                "starts CPU processes, --gpus one rank per GPU)"
            )
        if self.launcher == "slurm" and self.gpus is not None:
            raise InvalidArgument(
                f"--gpus {self.gpus} with --launcher slurm: the login node's GPUs do not "
                "train; pass --gpus-per-node N"
            )
        if self.slurm.gpus_per_node is not None and self.procs is not None:
            raise InvalidArgument(
                f"--procs {self.procs} and --gpus-per-node {self.slurm.gpus_per_node}: pass "
                "one of them"
            )

    def processes_per_node(self) -> int:
        """Ranks per node of a Slurm job: one per asked GPU, ``--procs``, else 1."""
        return self.slurm.gpus_per_node or self.procs or 1


def parse_gpus(text: str) -> Gpus:
    """``--gpus``'s value: ``all`` or a positive number."""
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(f"--gpus {text!r}: expected a number of GPUs or 'all'") from None
    if value < 1:
        raise InvalidArgument(
            f"--gpus {value}: expected at least 1 GPU (for CPU processes use --procs N)"
        )
    return value


def visible_cuda_devices() -> int:
    """CUDA devices this process may use (``CUDA_VISIBLE_DEVICES`` applied); 0 without CUDA."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def local_processes(settings: LaunchSettings, visible: int | None = None) -> int:
    """Ranks to start on this machine.

    Args:
        settings: The launch flags.
        visible: CUDA devices visible here (default: counted with torch).

    Raises:
        FailedPrecondition: ``--gpus`` asks for more devices than are visible.
    """
    if settings.procs is not None:
        return settings.procs
    count = visible_cuda_devices() if visible is None else visible
    if settings.gpus is None:
        return max(1, count)  # every GPU; one CPU process on a machine without one
    wanted = count if settings.gpus == "all" else settings.gpus
    if wanted > count or count == 0:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
        raise FailedPrecondition(
            f"--gpus {settings.gpus}: {count} CUDA device(s) visible on this machine{where}; "
            "pass at most that many, or --procs N for CPU processes"
        )
    return wanted


@dataclass(frozen=True)
class TrainingCommand:
    """The files of one training run (the flags of ``python -m site_agent.training``).

    Attributes:
        recipe: The training recipe (YAML).
        shard: The shard manifest ``expert-<k>.json``.
        output: The run directory (``train.log`` goes here too).
        image_root: Directory the shard's images are under.
        base_model: Local base checkpoint directory.
        processes: Ranks on this machine (one per GPU, or gloo processes on CPU); above 1 the
            trainer runs under torchrun.
    """

    recipe: Path
    shard: Path
    output: Path
    image_root: Path | None = None
    base_model: Path | None = None
    processes: int = 1

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise InvalidArgument(f"processes: expected at least 1, got {self.processes}")

    def argv(self, shutdown_seconds: float = 900.0) -> list[str]:
        """The child's command line; always ``--resume``, so a restart continues the run.

        Args:
            shutdown_seconds: Under torchrun, how long the ranks may take to checkpoint after
                a SIGTERM before torchrun kills them.
        """
        argv = [sys.executable, *launcher_argv(self.processes, shutdown_seconds)]
        return [*argv, *self.trainer_argv()]

    def trainer_argv(self) -> list[str]:
        """The trainer's module and flags (what torchrun or ``python`` runs)."""
        argv = ["-m", "site_agent.training"]
        argv += ["--recipe", str(self.recipe), "--shard", str(self.shard)]
        if self.image_root is not None:
            argv += ["--image-root", str(self.image_root)]
        argv += ["--output", str(self.output)]
        if self.base_model is not None:
            argv += ["--base-model", str(self.base_model)]
        return [*argv, "--resume", "--progress", "-"]


def launcher_argv(processes: int, shutdown_seconds: float) -> list[str]:
    """Python's arguments before the trainer's ``-m``: none for one process, else torchrun on
    this node (standalone rendezvous on a free port, no restarts of its own)."""
    if processes == 1:
        return []
    return [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={processes}",
        "--max-restarts=0",
        f"--shutdown-timeout={max(1, round(shutdown_seconds))}",
    ]


def rank_failure(path: Path) -> tuple[int, str] | None:
    """(exit code, message) of the first failing rank from a torchrun error file, or None.

    torchrun writes ``path`` (its ``TORCHELASTIC_ERROR_FILE``) when a rank that failed left an
    error file: the rank's own record, with the rank's exit code as ``errorCode``.
    """
    try:
        record = json.loads(path.read_text(encoding="utf-8"))["message"]
        code = int(record.get("errorCode", ExitCode.ERROR))
        info = record.get("extraInfo", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    rank = info.get("rank") if isinstance(info, dict) else None
    # No rank: torchrun's own failure (a signal, the rendezvous), recorded by its @record.
    where = f"rank {rank}" if rank is not None else "torchrun"
    return code, f"{where}: {record.get('message', '')}"
