"""How the supervisor starts a trainer: the :class:`Launcher` and :class:`TrainerProcess`
interfaces, and the :class:`LocalLauncher` that runs it on this machine (``site_agent.slurm``
has the Slurm one)."""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Protocol

from site_agent.launch import LAUNCHER_ERROR_NAME, TrainingCommand, rank_failure

__all__ = ["Launcher", "LocalLauncher", "TrainerProcess"]

# prctl's option: a signal for this process when its parent dies.
PR_SET_PDEATHSIG = 1


class TrainerProcess(Protocol):
    """A running trainer as the supervisor sees it: a local process (``subprocess.Popen`` is
    one) or a Slurm job (:class:`site_agent.slurm.SlurmJob`).

    ``stdout`` yields the trainer's JSON progress lines until it ends; ``send_signal(SIGTERM)``
    asks every rank to checkpoint and stop; ``wait`` raises ``subprocess.TimeoutExpired``.
    """

    @property
    def pid(self) -> int: ...

    @property
    def stdout(self) -> Iterable[str] | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    """Starts the trainer, and says after a failure which rank failed and why."""

    def start(self, attempt: int, log: IO[str]) -> TrainerProcess:
        """Starts attempt ``attempt``; its diagnostics go to ``log`` (``train.log``)."""
        ...

    def failure(self, exit_code: int) -> tuple[int, str] | None:
        """(exit code, message) of the failing rank when the launcher knows better than
        ``exit_code`` (torchrun exits 1 whatever a rank did); None otherwise."""
        ...


class LocalLauncher:
    """The trainer on this machine: ``python -m site_agent.training``, or torchrun around it.

    Args:
        command: The run's files and number of ranks.
        stop_grace_seconds: How long the ranks get to checkpoint after SIGTERM (torchrun's
            shutdown timeout).
        env: The child's environment (default: this process's).
        argv: Replaces the child's command line (tests inject failing commands with it).
    """

    def __init__(
        self,
        command: TrainingCommand,
        stop_grace_seconds: float,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.argv = list(argv) if argv is not None else command.argv(stop_grace_seconds)
        self.env = dict(env) if env is not None else dict(os.environ)
        self.error_file = command.output / LAUNCHER_ERROR_NAME
        if command.processes > 1:
            self.env["TORCHELASTIC_ERROR_FILE"] = str(self.error_file)

    def start(self, attempt: int, log: IO[str]) -> subprocess.Popen[str]:
        self.error_file.unlink(missing_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
        log.write(f"--- supervisor: attempt {attempt}, {stamp}: {shlex.join(self.argv)}\n")
        log.flush()
        # A session of its own: a Ctrl-C at the agent's terminal reaches the agent, which
        # stops the trainer with SIGTERM (a checkpoint), not the trainer directly.
        return subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=self.env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )

    def failure(self, exit_code: int) -> tuple[int, str] | None:
        return rank_failure(self.error_file) if exit_code else None


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM it (a checkpoint, then exit) when the agent dies, so
    a restarted agent never finds an orphaned trainer writing the same checkpoints (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
