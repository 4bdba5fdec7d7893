"""A site's trainer as a Slurm batch job: submit it, follow it, resubmit it, stop it.

The agent stays on the login node (it holds the outbound connection and the site key) and
hands the trainer to Slurm: ``sbatch`` of ``deploy/slurm/atoll-train.sbatch``, a template a
site admin can read and adapt, which runs ``srun`` + torchrun on every node with a c10d
rendezvous on the first node. :class:`SlurmLauncher` plugs into the same
:class:`~site_agent.supervisor.Supervisor` loop as a local trainer:

* before submitting, :func:`check_slurm` finds ``sbatch``, ``srun``, ``scontrol`` and
  ``scancel`` and :func:`check_shared_workdir` refuses a run directory on node-local storage;
  the job itself first checks that every node reads a token the agent wrote there;
* the job's rank 0 appends its JSON progress lines to ``RUN/progress.jsonl`` on that shared
  storage; :class:`SlurmJob` tails them to the supervisor (and so to the coordinator's
  heartbeats), with a ``job`` event at each change of the job's state;
* Slurm itself requeues the job after a preemption or node failure (``--requeue``; the
  trainer checkpoints on SIGTERM and resumes); after a time limit or a failure the
  supervisor submits a new job (bounded, with backoff), which resumes from the checkpoint;
* an input error on any rank (torchelastic's error files, one per node) or a job cancelled by
  someone else (``scancel``) stops for good, with the reason; the agent's own stop sends
  SIGTERM to every rank (``scancel --signal=TERM``): they checkpoint the same step and exit;
* a restarted agent finds its job in ``RUN/slurm-job.json`` and follows it again rather than
  submitting a second one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from protocol.errors import FailedPrecondition, NotFound
from protocol.exit_codes import ExitCode
from site_agent.launch import LaunchSettings, TrainingCommand, rank_failure

__all__ = [
    "DEFAULT_TEMPLATE",
    "SlurmJob",
    "SlurmLauncher",
    "check_shared_workdir",
    "check_slurm",
    "check_template",
]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "atoll-train.sbatch"
PROGRESS_NAME = "progress.jsonl"
JOB_RECORD_NAME = "slurm-job.json"
SHARED_CHECK_NAME = "shared-check"
TOOLS = ("sbatch", "srun", "scontrol", "scancel")
# States a job can leave again; every other state is final.
ACTIVE = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
     "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED"}
)  # fmt: skip
# File systems only the machine that mounts them sees.
NODE_LOCAL_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})


def check_template(template: Path | None) -> Path:
    """The batch script to submit (``--slurm-template``, default ours); NotFound if missing."""
    path = template or DEFAULT_TEMPLATE
    if not path.is_file():
        raise NotFound(f"--slurm-template {path}: no such file (a batch script to submit)")
    return path


def check_slurm() -> None:
    """Raises FailedPrecondition naming the Slurm commands missing from PATH."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise FailedPrecondition(
            f"--launcher slurm: {', '.join(missing)} not found on PATH "
            f"({os.environ.get('PATH', '')}); run the agent on a login node of the cluster "
            "(or load its Slurm module), or use --launcher local"
        )


def filesystem_type(path: Path) -> str:
    """The type of the file system ``path`` is on, from ``/proc/self/mounts`` ("" if unknown)."""
    resolved = str(path.resolve())
    best, kind = "", ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def check_shared_workdir(workdir: Path, nodes: int) -> None:
    """Refuses a workdir that the job's nodes cannot all see, before anything is submitted.

    A multi-node job's checkpoints, progress and error files must be on storage every node
    mounts (NFS, Lustre, GPFS, BeeGFS...). A node-local file system (tmpfs) is refused here;
    the job checks the rest itself (every node must read a token the agent wrote).
    """
    if not workdir.is_dir():
        raise NotFound(f"--workdir {workdir}: not a directory")
    kind = filesystem_type(workdir)
    if nodes > 1 and kind in NODE_LOCAL_FILESYSTEMS:
        raise FailedPrecondition(
            f"--workdir {workdir} is on {kind}, which only this machine sees, but --nodes "
            f"{nodes} needs it on storage every compute node mounts (NFS, Lustre, GPFS...)"
        )


def scontrol_job(job_id: int) -> dict[str, str] | None:
    """``scontrol show job`` as a mapping, or None once slurmctld no longer knows the job."""
    done = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", str(job_id)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return None
        raise FailedPrecondition(f"scontrol show job {job_id} failed: {done.stderr.strip()}")
    fields: dict[str, str] = {}
    for token in done.stdout.split():
        key, _, value = token.partition("=")
        fields.setdefault(key, value)
    return fields


class SlurmJob:
    """One submitted job, as the supervisor sees a trainer process (``pid`` is the job id).

    ``stdout`` yields the progress lines rank 0 appends to ``progress`` (from ``offset``), plus
    a ``job`` event whenever the job's state changes, until the job ends.

    Args:
        job_id: The Slurm job id.
        progress: The shared progress file.
        offset: Where this job's lines start in it.
        poll_seconds: How often the job's state is read.
    """

    def __init__(self, job_id: int, progress: Path, offset: int, poll_seconds: float = 5.0) -> None:
        self.job_id = job_id
        self.progress = progress
        self.offset = offset
        self.poll_seconds = poll_seconds
        self.state = "PENDING"
        self.fields: dict[str, str] = {}
        self.signalled = False  # scancel --signal=TERM from this agent
        self.cancelled = False  # scancel from this agent
        self._code: int | None = None

    @property
    def pid(self) -> int:
        return self.job_id

    @property
    def stdout(self) -> Iterator[str]:
        return self._lines()

    def _lines(self) -> Iterator[str]:
        state = ""
        partial = ""
        while True:
            ended = self._refresh()
            if self.state != state:
                state = self.state
                yield json.dumps(
                    {
                        "event": "job",
                        "time": round(time.time(), 3),
                        "job_id": self.job_id,
                        "state": state,
                        "restarts": int(self.fields.get("Restarts", "0") or 0),
                        "reason": self.fields.get("Reason", ""),
                        "nodes": self.fields.get("NodeList", ""),
                    }
                )
            text = self._read_new()
            if text:
                partial += text
                *complete, partial = partial.split("\n")
                yield from complete
            if ended:
                return
            time.sleep(self.poll_seconds)

    def _read_new(self) -> str:
        try:
            with self.progress.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return ""
        self.offset += len(data)
        return data.decode("utf-8", errors="replace")

    def _refresh(self) -> bool:
        """Reads the job's state; True once it ended (``_code`` then set)."""
        if self._code is not None:
            return True
        fields = scontrol_job(self.job_id)
        if fields is None:
            self.state, self._code = "GONE", int(ExitCode.ERROR)
            return True
        self.fields = fields
        self.state = fields.get("JobState", "UNKNOWN")
        if self.state in ACTIVE:
            return False
        exit_code = int(fields.get("ExitCode", "1:0").split(":")[0] or 1)
        self._code = 0 if self.state == "COMPLETED" else exit_code or int(ExitCode.ERROR)
        return True

    def poll(self) -> int | None:
        return self._code if self._refresh() else None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"slurm job {self.job_id}", timeout or 0.0)
            time.sleep(self.poll_seconds)
        return code

    def send_signal(self, sig: int) -> None:
        if self.state == "PENDING":  # nothing runs yet, so nothing to checkpoint
            self.kill()
            return
        # Every process of the job's steps (torchrun and its ranks): each rank checkpoints.
        self.signalled = True
        _scancel(f"--signal={int(sig)}", str(self.job_id))

    def kill(self) -> None:
        self.cancelled = True
        _scancel(str(self.job_id))


def _scancel(*args: str) -> None:
    done = subprocess.run(
        ["scancel", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        log.warning("[slurm] scancel %s: %s", " ".join(args), done.stderr.strip())


class SlurmLauncher:
    """Submits the trainer as a Slurm job (the supervisor's :class:`Launcher` for Slurm).

    Args:
        command: The run's files (``output`` must be on storage every node sees).
        settings: The job's resources (``settings.slurm``) and ranks per node.
        shutdown_seconds: How long the ranks may take to checkpoint after a SIGTERM.
        template: The batch script (default ``deploy/slurm/atoll-train.sbatch``).
        env: The environment sbatch runs in (and, ``--export=ALL``, the job's).
        poll_seconds: How often the job's state is read.
    """

    def __init__(
        self,
        command: TrainingCommand,
        settings: LaunchSettings,
        shutdown_seconds: float = 900.0,
        template: Path | None = None,
        env: Mapping[str, str] | None = None,
        poll_seconds: float = 5.0,
    ) -> None:
        self.command = command
        self.settings = settings
        self.shutdown_seconds = shutdown_seconds
        self.template = check_template(template)
        self.env = dict(env) if env is not None else dict(os.environ)
        self.poll_seconds = poll_seconds
        self.run_dir = command.output
        self.job: SlurmJob | None = None

    def sbatch_argv(self) -> list[str]:
        """The ``sbatch`` command line (resources from the flags, then the template)."""
        slurm = self.settings.slurm
        argv = ["sbatch", "--parsable", f"--nodes={slurm.nodes}"]
        argv += [f"--output={self.run_dir / 'train.log'}", "--open-mode=append"]
        argv += [f"--chdir={self.run_dir}", "--export=ALL"]
        if slurm.gpus_per_node is not None:
            argv.append(f"--gpus-per-node={slurm.gpus_per_node}")
        for flag, value in (
            ("partition", slurm.partition),
            ("time", slurm.time),
            ("account", slurm.account),
        ):
            if value is not None:
                argv.append(f"--{flag}={value}")
        argv += [*slurm.extra_args, str(self.template)]
        trainer = self.command.trainer_argv()
        progress = trainer.index("--progress")
        trainer[progress + 1] = str(self.run_dir / PROGRESS_NAME)
        return argv + trainer

    def start(self, attempt: int, log_file: IO[str]) -> SlurmJob:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        progress = self.run_dir / PROGRESS_NAME
        previous = self._running_job(progress)
        if previous is not None:
            log_file.write(f"--- supervisor: attempt {attempt}: following Slurm job "
                           f"{previous.job_id} again\n")  # fmt: skip
            log_file.flush()
            self.job = previous
            return previous
        for name in os.listdir(self.run_dir):
            if name.startswith("launcher-error"):
                (self.run_dir / name).unlink(missing_ok=True)
        token = secrets.token_hex(16)
        (self.run_dir / SHARED_CHECK_NAME).write_text(token + "\n")
        env = {
            **self.env,
            "ATOLL_PYTHON": sys.executable,
            "ATOLL_RUN_DIR": str(self.run_dir),
            "ATOLL_PROCS_PER_NODE": str(self.settings.processes_per_node()),
            "ATOLL_SHARED_TOKEN": token,
            "ATOLL_SHUTDOWN_SECONDS": str(max(1, round(self.shutdown_seconds))),
        }
        argv = self.sbatch_argv()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
        log_file.write(f"--- supervisor: attempt {attempt}, {stamp}: {shlex.join(argv)}\n")
        log_file.flush()
        offset = progress.stat().st_size if progress.exists() else 0
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        if done.returncode != 0:
            raise FailedPrecondition(
                f"sbatch refused the job (exit code {done.returncode}): {done.stderr.strip()}"
            )
        job_id = int(done.stdout.strip().split(";")[0])
        record = {"job_id": job_id, "progress_offset": offset, "submitted_at": time.time()}
        (self.run_dir / JOB_RECORD_NAME).write_text(json.dumps(record) + "\n")
        log.info("[slurm] submitted job %d (%d node(s))", job_id, self.settings.slurm.nodes)
        self.job = SlurmJob(job_id, progress, offset, self.poll_seconds)
        return self.job

    def _running_job(self, progress: Path) -> SlurmJob | None:
        """The job a previous agent submitted, when Slurm still has it queued or running."""
        try:
            record = json.loads((self.run_dir / JOB_RECORD_NAME).read_text())
            job_id, offset = int(record["job_id"]), int(record["progress_offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        fields = scontrol_job(job_id)
        if fields is None or fields.get("JobState") not in ACTIVE:
            return None
        return SlurmJob(job_id, progress, offset, self.poll_seconds)

    def failure(self, exit_code: int) -> tuple[int, str] | None:
        job = self.job
        if job is None or exit_code == 0:
            return None
        if job.state == "CANCELLED" and not (job.signalled or job.cancelled):
            # Before the error files: torchrun records the SIGTERM of the cancellation too.
            return int(ExitCode.PRECONDITION), (
                f"Slurm job {job.job_id} was cancelled (scancel, by a user or an admin); "
                "not resubmitted. Run `site-agent join` again to resume from the last checkpoint"
            )
        for path in sorted(self.run_dir.glob("launcher-error*.json")):
            failed = rank_failure(path)
            if failed is not None:
                return failed[0], f"Slurm job {job.job_id}, {failed[1]}"
        if exit_code == ExitCode.PRECONDITION:
            said = _lines_from(self.run_dir / "train.log", "atoll: ")
            return int(ExitCode.PRECONDITION), f"Slurm job {job.job_id}: " + (
                said or "the job's own checks failed (see train.log)"
            )
        reason = job.fields.get("Reason", "")
        return exit_code, f"Slurm job {job.job_id} ended {job.state} (reason {reason})"


def _lines_from(path: Path, prefix: str) -> str:
    """The last lines of a log that start with ``prefix`` (a job's own error lines)."""
    try:
        lines = path.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return ""
    return "; ".join(line for line in lines if line.startswith(prefix))[-2000:]
