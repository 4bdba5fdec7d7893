"""The trainer's progress as JSON lines, one event per line, which the supervisor reads.

:class:`ProgressLog` writes the events; :class:`ProgressReporter` turns the Hugging Face
Trainer's log and save events into them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback

from protocol.errors import AtollError
from site_agent.training import parallelize

__all__ = ["CHECKPOINT_PREFIX", "ProgressLog", "ProgressReporter"]

# The Trainer's checkpoint folders: checkpoints/checkpoint-<step>.
CHECKPOINT_PREFIX = "checkpoint-"


class ProgressLog:
    """JSON lines a supervisor reads, one event per line, flushed at once.

    Every line has ``event`` and ``time`` (Unix seconds). Events: ``phase`` (``phase``),
    ``start``, ``progress`` (``step``, ``total_steps``, ``loss``, ``learning_rate``,
    ``tokens_per_second``, ``eta_seconds``, ``epoch``, ``tokens_seen``), ``checkpoint``
    (``step``, ``path``), ``stopped`` (``step``, ``checkpoint``: SIGTERM was honoured),
    ``done`` (``model_dir``, ``step``, ``total_steps``, ``final_loss``, ``mean_loss``,
    ``seconds``, ``processes``, ``nodes``, ``gpus``) and ``error`` (``error``, ``message``,
    ``exit_code``). Only the main process (rank 0) writes.

    Args:
        stream: Where the lines go.
        owned: Close ``stream`` in :meth:`close`.
    """

    def __init__(self, stream: TextIO, owned: bool = False) -> None:
        self._stream = stream
        self._owned = owned
        self._enabled = parallelize.is_main_process()
        self._replaced_stdout: TextIO | None = None

    @classmethod
    def open(cls, target: str) -> ProgressLog:
        """``-`` for standard output, else a file the lines are appended to.

        For ``-`` the log keeps a private handle on the original standard output and points
        ``sys.stdout`` at standard error, so nothing a library prints can corrupt the lines.
        """
        if target == "-":
            stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
            sys.stdout.flush()
            log = cls(stream, owned=True)
            log._replaced_stdout = sys.stdout
            sys.stdout = sys.stderr
            return log
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path.open("a", buffering=1), owned=True)

    def emit(self, event: str, **fields: Any) -> None:
        """Writes one event line."""
        if not self._enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._stream.write(json.dumps(record, sort_keys=False) + "\n")
        self._stream.flush()

    def error(self, error: AtollError) -> None:
        """Writes an ``error`` event for a domain error."""
        self.emit(
            "error",
            error=type(error).__name__,
            message=str(error),
            exit_code=int(error.exit_code),
        )

    def close(self) -> None:
        """Closes the stream if this log opened it, and gives ``sys.stdout`` back."""
        if self._replaced_stdout is not None:
            sys.stdout = self._replaced_stdout
            self._replaced_stdout = None
        if self._owned and not self._stream.closed:
            self._stream.close()


class ProgressReporter(TrainerCallback):
    """Turns the Trainer's log and save events into progress lines."""

    def __init__(self, progress: ProgressLog) -> None:
        self.progress = progress
        self.first_step: int | None = None
        self.started = 0.0
        self.last_time = 0.0
        self.last_tokens = 0
        self.last_loss: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The first step after (re)start: a resumed state is loaded only after on_train_begin.
        if self.first_step is None:
            self.first_step = state.global_step
            self.started = self.last_time = time.monotonic()
            self.last_tokens = state.num_input_tokens_seen

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not logs or "loss" not in logs or self.first_step is None:
            return
        now = time.monotonic()
        steps_here = max(1, state.global_step - self.first_step)
        eta = (now - self.started) / steps_here * (state.max_steps - state.global_step)
        tokens = state.num_input_tokens_seen
        rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        self.last_loss = float(logs["loss"])
        self.progress.emit(
            "progress",
            step=state.global_step,
            total_steps=state.max_steps,
            loss=self.last_loss,
            learning_rate=float(logs.get("learning_rate", 0.0)),
            tokens_per_second=round(rate, 2),
            eta_seconds=round(eta, 2),
            epoch=round(float(state.epoch or 0.0), 4),
            tokens_seen=int(tokens),
        )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        self.progress.emit("checkpoint", step=state.global_step, path=str(path))
