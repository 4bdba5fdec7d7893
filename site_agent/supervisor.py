"""Runs an expert's training as a child process and keeps it going through crashes.

The site agent never trains in its own process: a crash of the trainer (a CUDA error, the
out-of-memory killer, a bug) must not take the agent down, and a restarted trainer must pick
up from its last checkpoint. :class:`Supervisor` does that:

* it starts ``python -m site_agent.training ... --resume`` (see
  :mod:`site_agent.training.__main__`), or for several ranks PyTorch's own launcher around it
  (``python -m torch.distributed.run --standalone --nproc-per-node N``, one rank per device,
  no restarts of its own: the supervisor restarts the whole group), with the child's standard
  error appended to ``OUTPUT/train.log`` (across restarts) and its standard output, the JSON
  progress lines, drained by a background thread, so the child never waits on a full pipe
  (:class:`~site_agent.local_launcher.LocalLauncher`). Another
  :class:`~site_agent.local_launcher.Launcher` starts it elsewhere instead
  (``site_agent.slurm``: a Slurm job);
* it hands every progress event to ``on_event(event)`` and calls ``on_tick()`` every
  ``tick_seconds`` even when no event arrives (the agent heartbeats from it), both on the
  thread that called :meth:`Supervisor.run`; a callback that blocks (a heartbeat retrying)
  delays the next callback, never the training;
* when the child dies of something a restart can fix (exit 1, a signal, a SIGTERM it did not
  get from us, exit 0 without a ``done`` event) it starts it again after a backoff; after
  ``max_restarts`` restarts in a row without a new checkpoint it gives up with
  :class:`TrainingFailed`. Bad input (exit 2, 3, 4, 7, 8) fails at once: a restart would only
  fail the same way. Under torchrun, which exits 1 whatever a rank did, the failing rank's exit
  code and message come from torchelastic's error file (``OUTPUT/launcher-error.json``);
* :meth:`Supervisor.stop` sends SIGTERM to the trainer (torchrun passes it to every rank);
  the ranks agree on a step, checkpoint it and exit.

Example::

    supervisor = Supervisor(
        TrainingCommand(recipe=Path("recipe.yaml"), shard=Path("expert-3.json"),
                        image_root=Path("images"), output=Path("run")),
        SupervisorConfig(tick_seconds=30),
        on_event=lambda event: print(event["event"], event.get("step")),
        on_tick=send_heartbeat,
    )
    done = supervisor.run()  # the trainer's ``done`` event; None once stop() was called

Besides the trainer's events (see :class:`site_agent.training.progress_log.ProgressLog`),
``on_event`` receives the supervisor's own ``restart`` event before each restart: ``attempt``
(the attempt about to start, 2 for the first restart), ``exit_code`` (negative: killed by that
signal), ``cause``, ``delay_seconds`` and ``restarts_left``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import AtollError, InvalidArgument
from protocol.exit_codes import ExitCode
from site_agent.launch import TrainingCommand
from site_agent.local_launcher import Launcher, LocalLauncher, TrainerProcess

__all__ = [
    "EventCallback",
    "Supervisor",
    "SupervisorConfig",
    "TickCallback",
    "TrainingCommand",
    "TrainingFailed",
]

log = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], None]
TickCallback = Callable[[], None]

# Exit codes that mean the inputs are wrong: the same command would fail the same way again.
INPUT_ERRORS = frozenset(
    {
        ExitCode.USAGE,
        ExitCode.BAD_INPUT,
        ExitCode.NOT_FOUND,
        ExitCode.PRECONDITION,
        ExitCode.VERIFY_FAILED,
    }
)
LOG_NAME = "train.log"


@dataclass(frozen=True)
class SupervisorConfig:
    """How hard the supervisor tries, and how often it calls back.

    Attributes:
        max_restarts: Restarts in a row without a new checkpoint before giving up. A trainer
            that saved a checkpoint since the previous restart made progress; the count starts
            again, so a week-long run survives any number of crashes that are far apart.
        backoff_seconds: Wait before the first restart.
        backoff_factor: Each further restart in a row waits this many times longer.
        max_backoff_seconds: The longest wait.
        tick_seconds: Interval of ``on_tick`` calls.
        stop_grace_seconds: After :meth:`Supervisor.stop`, how long the trainer may take to
            save its checkpoint before it is killed.
        log_tail_lines: Lines of ``train.log`` quoted in a :class:`TrainingFailed` message.
    """

    max_restarts: int = 3
    backoff_seconds: float = 10.0
    backoff_factor: float = 2.0
    max_backoff_seconds: float = 300.0
    tick_seconds: float = 30.0
    stop_grace_seconds: float = 900.0
    log_tail_lines: int = 20

    def __post_init__(self) -> None:
        minimums = {
            "max_restarts": 0,
            "backoff_seconds": 0,
            "backoff_factor": 1,
            "max_backoff_seconds": 0,
            "stop_grace_seconds": 0,
            "log_tail_lines": 0,
        }
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise InvalidArgument(
                    f"supervisor.{name} must be at least {minimum}, got {getattr(self, name)}"
                )
        if self.tick_seconds <= 0:
            raise InvalidArgument(
                f"supervisor.tick_seconds must be positive, got {self.tick_seconds}"
            )

    def backoff(self, failures: int) -> float:
        """Seconds to wait before restart number ``failures`` in a row (1 for the first)."""
        delay = self.backoff_seconds * self.backoff_factor ** max(0, failures - 1)
        return float(min(delay, self.max_backoff_seconds))


class TrainingFailed(AtollError):
    """The trainer failed for good: bad input, or crashes that restarts did not cure.

    An :class:`AtollError` of its own (not a bad-input subclass): most causes are crashes, and
    the supervisor's caller did nothing wrong. For bad input, ``exit_code`` is the trainer's
    own (3, 4, 7, 8), so a command line that ends here exits as the trainer did.

    Attributes:
        child_exit_code: The last exit status of the trainer (negative: killed by a signal).
        restarts: How many times it was restarted before giving up.
        log_tail: The last lines of ``train.log``.
    """

    def __init__(self, message: str, child_exit_code: int, restarts: int, log_tail: str) -> None:
        super().__init__(message)
        self.child_exit_code = child_exit_code
        self.restarts = restarts
        self.log_tail = log_tail
        if child_exit_code in INPUT_ERRORS:
            self.exit_code = ExitCode(child_exit_code)


@dataclass(frozen=True)
class _Exited:
    """The reader thread's last item: the child closed its output and exited."""

    code: int


@dataclass
class _Attempt:
    """What one run of the child reported."""

    exit_code: int = 0
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    newest_checkpoint: int = -1  # the step of the newest checkpoint it saved


class Supervisor:
    """Runs the trainer as a child process until it is done, restarting it after crashes.

    Args:
        command: The run's files.
        config: Retries, backoff and callback interval.
        on_event: Called with each progress event (a dict with ``event`` and ``time``) on the
            thread that called :meth:`run`. An exception from it stops the trainer (with a
            checkpoint) and propagates out of :meth:`run`.
        on_tick: Called every ``config.tick_seconds`` on the same thread, events or not, also
            while waiting to restart. Exceptions propagate as from ``on_event``.
        env: The child's environment (default: this process's).
        argv: Replaces the child's command line (tests inject failing commands with it).
        launcher: Starts the trainer elsewhere (a Slurm job); default a :class:`LocalLauncher`
            of ``command``, ``env`` and ``argv``.
    """

    def __init__(
        self,
        command: TrainingCommand,
        config: SupervisorConfig | None = None,
        *,
        on_event: EventCallback | None = None,
        on_tick: TickCallback | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        self.command = command
        self.config = config or SupervisorConfig()
        self.log_path = command.output / LOG_NAME
        self._on_event = on_event or (lambda event: None)
        self._on_tick = on_tick or (lambda: None)
        self.launcher = launcher or LocalLauncher(
            command, self.config.stop_grace_seconds, env, argv
        )
        self._lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._process: TrainerProcess | None = None
        self._next_tick = 0.0
        self._kill_at: float | None = None  # SIGKILL deadline after stop()

    @property
    def pid(self) -> int | None:
        """The process id of the running trainer, or None between runs."""
        with self._lock:
            process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def stop(self) -> None:
        """Asks the trainer to save a checkpoint and exit (SIGTERM), and :meth:`run` to return
        None instead of restarting it. Returns at once; safe from any thread or a callback."""
        with self._lock:
            self._stop_requested.set()
            process = self._process
            if process is not None and process.poll() is None:
                log.info("[Supervisor.stop] sending SIGTERM to trainer pid %d", process.pid)
                process.send_signal(signal.SIGTERM)
                self._kill_at = time.monotonic() + self.config.stop_grace_seconds

    def run(self) -> dict[str, Any] | None:
        """Trains to the end, restarting the trainer after crashes.

        Returns:
            The trainer's ``done`` event (``model_dir``, ``step``, ``total_steps``,
            ``final_loss``, ``mean_loss``, ``seconds``), or None if :meth:`stop` was called
            before the trainer finished.

        Raises:
            TrainingFailed: bad input, or ``max_restarts`` restarts in a row without progress.
        """
        self.command.output.mkdir(parents=True, exist_ok=True)
        self._next_tick = time.monotonic() + self.config.tick_seconds
        failures = 0  # failures in a row without a new checkpoint
        attempt = 1
        newest_checkpoint = -1
        while not self._stop_requested.is_set():
            result = self._run_once(attempt)
            code = result.exit_code
            if result.done is not None and code == 0:
                return result.done
            if self._stop_requested.is_set():
                return None
            cause = _describe(code)
            if code in INPUT_ERRORS:
                raise self._failure(
                    f"training failed: the trainer stopped with exit code {code} ({cause}); "
                    "not restarted, as a restart would end the same way",
                    result,
                    attempt,
                )
            if result.newest_checkpoint > newest_checkpoint:
                newest_checkpoint, failures = result.newest_checkpoint, 0
            failures += 1
            if failures > self.config.max_restarts:
                raise self._failure(
                    f"training failed: the trainer failed {failures} times in a row without "
                    f"saving a new checkpoint (last: exit code {code}, {cause}); gave up after "
                    f"{self.config.max_restarts} restarts in a row (supervisor.max_restarts)",
                    result,
                    attempt,
                )
            delay = self.config.backoff(failures)
            attempt += 1
            log.warning(
                "[Supervisor.run] trainer exited with code %d (%s); restart %d of %d in %.1f s",
                code,
                cause,
                failures,
                self.config.max_restarts,
                delay,
            )
            self._on_event(
                {
                    "event": "restart",
                    "time": round(time.time(), 3),
                    "attempt": attempt,
                    "exit_code": code,
                    "cause": cause,
                    "delay_seconds": delay,
                    "restarts_left": self.config.max_restarts - failures,
                }
            )
            self._wait(delay)
        return None

    def _run_once(self, attempt: int) -> _Attempt:
        """Runs the child once, relaying its events, until it exits."""
        events: queue.Queue[dict[str, Any] | _Exited] = queue.Queue()
        result = _Attempt()
        with self._lock:
            if self._stop_requested.is_set():
                result.exit_code = int(ExitCode.INTERRUPTED)
                return result
            process = self._spawn(attempt)
            self._process = process
        reader = threading.Thread(
            target=_drain, args=(process, events), name="trainer-stdout", daemon=True
        )
        reader.start()
        try:
            while True:
                item = self._next_item(events, process)
                if isinstance(item, _Exited):
                    result.exit_code = item.code
                    failure = self.launcher.failure(item.code)
                    if failure is not None:  # torchrun's 1 hides the rank's own exit code
                        result.exit_code = failure[0]
                        result.error = {"message": failure[1]}
                    return result
                if item is None:  # a tick, or the stop deadline
                    continue
                if item.get("event") == "done":
                    result.done = item
                elif item.get("event") == "error":
                    result.error = item
                elif item.get("event") == "checkpoint" and isinstance(item.get("step"), int):
                    result.newest_checkpoint = max(result.newest_checkpoint, item["step"])
                self._on_event(item)
        finally:
            if process.poll() is None:  # a callback raised (or KeyboardInterrupt): stop it
                self._terminate(process)
            reader.join()
            with self._lock:
                self._process = None

    def _spawn(self, attempt: int) -> TrainerProcess:
        with self.log_path.open("a", encoding="utf-8") as train_log:
            if not _ends_a_line(self.log_path):
                train_log.write("\n")
            process = self.launcher.start(attempt, train_log)
        log.info("[Supervisor.run] attempt %d: trainer pid %d", attempt, process.pid)
        return process

    def _next_item(
        self, events: queue.Queue[dict[str, Any] | _Exited], process: TrainerProcess
    ) -> dict[str, Any] | _Exited | None:
        """The next item from the reader, or None when a tick or the stop deadline came first.

        Ticks are called here when due, also under a flood of events.
        """
        wake = self._next_tick
        if self._kill_at is not None:
            wake = min(wake, self._kill_at)
        try:
            item: dict[str, Any] | _Exited | None = events.get(
                timeout=max(0.0, wake - time.monotonic())
            )
        except queue.Empty:
            item = None
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            self._kill_at = None
            if process.poll() is None:
                log.warning(
                    "[Supervisor.stop] trainer pid %d still running %.0f s after SIGTERM; "
                    "killing it",
                    process.pid,
                    self.config.stop_grace_seconds,
                )
                process.kill()
        self._tick()
        return item

    def _tick(self) -> None:
        if time.monotonic() < self._next_tick:
            return
        self._on_tick()
        self._next_tick = time.monotonic() + self.config.tick_seconds

    def _wait(self, seconds: float) -> None:
        """Waits before a restart, ticking; returns early on stop()."""
        deadline = time.monotonic() + seconds
        while not self._stop_requested.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            self._stop_requested.wait(min(deadline, self._next_tick) - now)
            self._tick()

    def _terminate(self, process: TrainerProcess) -> None:
        """SIGTERM (the trainer checkpoints and exits), SIGKILL after the grace period."""
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.config.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            log.warning("[Supervisor] trainer pid %d ignored SIGTERM; killing it", process.pid)
            process.kill()
            process.wait()

    def _failure(self, message: str, result: _Attempt, attempt: int) -> TrainingFailed:
        if result.error is not None and result.error.get("message"):
            message += f"\ntrainer error: {result.error['message']}"
        tail = _tail(self.log_path, self.config.log_tail_lines)
        message += f"\nlast {self.config.log_tail_lines} lines of {self.log_path}:\n{tail}"
        return TrainingFailed(
            message, child_exit_code=result.exit_code, restarts=attempt - 1, log_tail=tail
        )


def _drain(process: TrainerProcess, events: queue.Queue[dict[str, Any] | _Exited]) -> None:
    """Reads the child's JSON lines until it closes its output, then waits for its exit."""
    stream = process.stdout
    assert stream is not None
    try:
        for line in stream:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                events.put(event)
            else:
                log.warning("[Supervisor] not a progress line from the trainer: %r", line[:200])
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    events.put(_Exited(process.wait()))


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 0:
        return "exited without reporting done"
    if code == ExitCode.INTERRUPTED:
        return "stopped by a SIGTERM the supervisor did not send"
    try:
        return ExitCode(code).name.lower().replace("_", " ")
    except ValueError:
        return "unexpected exit code"


def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log that may be large."""
    if lines == 0 or not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, os.path.getsize(path) - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _ends_a_line(path: Path) -> bool:
    """Whether the file is empty or ends with a newline (a crash can cut a line short)."""
    with path.open("rb") as handle:
        if handle.seek(0, os.SEEK_END) == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
