"""Progress on anything a person waits for: a rich bar on a terminal, a few log lines elsewhere.

A bar redrawn several times a second floods a log file or a pipe (tqdm did: a benchmark's
output was thousands of carriage-return lines). So one helper decides by where stderr goes:

* a terminal: a rich progress display on stderr, one bar per task, gone when done;
* anything else: a log line (logger ``atoll.progress``, INFO) when a task starts, at most one
  every :data:`LINE_EVERY` seconds while it runs, and one when it ends; nothing at all where
  logging is not set up (a library call, a test).

Example::

    with progress_bars() as tasks:
        advance = tasks.add("fetching images", total=len(images))
        for image in images:
            fetch(image)
            advance(1)
        # bytes: tasks.add("upload expert-0", total=size, unit="bytes", completed=resumed)

Libraries that draw their own tqdm bars (huggingface_hub, transformers) are switched off by
:func:`quiet_library_bars` when stderr is not a terminal, through their documented switch.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["LINE_EVERY", "Advance", "Tasks", "progress_bars", "quiet_library_bars"]

log = logging.getLogger("atoll.progress")
LINE_EVERY = 30.0  # seconds between two log lines of one task when stderr is not a terminal
Advance = Callable[[int], None]
Unit = Literal["items", "bytes"]
Start = Callable[[str, int | None, Unit, int], Advance]  # (description, total, unit, completed)


class Tasks:
    """What :func:`progress_bars` yields: :meth:`add` starts a task."""

    def __init__(self, start: Start) -> None:
        self._start = start

    def add(
        self,
        description: str,
        total: int | None = None,
        *,
        unit: Unit = "items",
        completed: int = 0,
    ) -> Advance:
        """Starts a task of ``total`` items or bytes (None: unknown), ``completed`` of them
        already done (a resumed transfer); returns its ``advance(n)``."""
        return self._start(description, total, unit, completed)


def _shown(amount: float, unit: Unit) -> str:
    return decimal(int(amount)) if unit == "bytes" else f"{int(amount)}"


class _Amount(ProgressColumn):
    """``12/300`` for items, ``1.2/4.0 GB`` for bytes: each task in its own unit."""

    def __init__(self) -> None:
        super().__init__()
        self._items, self._bytes = MofNCompleteColumn(), DownloadColumn()

    def render(self, task: Task) -> Text:
        column = self._bytes if task.fields.get("unit") == "bytes" else self._items
        return column.render(task)


@dataclass
class _LineTask:
    description: str
    total: int | None
    unit: Unit
    done: int
    started: float = field(default_factory=time.monotonic)
    said: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        shown = _shown(self.done, self.unit)
        if self.total:
            return (
                f"{self.description}: {shown} of {_shown(self.total, self.unit)} "
                f"({100 * self.done / self.total:.0f}%)"
            )
        return f"{self.description}: {shown}"


class _Lines:
    """Tasks told in log lines: at the start, every LINE_EVERY seconds, at the end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tasks: list[_LineTask] = []

    def start(self, description: str, total: int | None, unit: Unit, completed: int) -> Advance:
        task = _LineTask(description, total, unit, completed)
        with self._lock:
            self.tasks.append(task)
        log.info("%s: started", task.line())

        def advance(n: int) -> None:
            with self._lock:
                task.done += n
                now = time.monotonic()
                if now - task.said < LINE_EVERY:
                    return
                task.said = now
            log.info("%s", task.line())

        return advance

    def finish(self) -> None:
        for task in self.tasks:
            seconds = time.monotonic() - task.started
            stopped = task.total is not None and task.done < task.total
            log.info("%s %s %.1f s", task.line(), "stopped after" if stopped else "in", seconds)


def _nothing(_n: int) -> None:
    return None


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Tasks]:
    """Progress for the tasks added inside the ``with``: bars on a terminal, log lines
    elsewhere, nothing when ``enabled`` is false (``--json``, a quiet caller).

    Safe to advance from several threads.
    """
    if not enabled:
        yield Tasks(lambda *_: _nothing)
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        lines = _Lines()
        try:
            yield Tasks(lines.start)
        finally:
            lines.finish()
        return
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        _Amount(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bars:

        def start(description: str, total: int | None, unit: Unit, completed: int) -> Advance:
            task = bars.add_task(description, total=total, completed=completed, unit=unit)
            return lambda n: bars.advance(task, n)

        yield Tasks(start)


def quiet_library_bars() -> None:
    """Switches off the tqdm bars of huggingface_hub and transformers (their documented
    ``HF_HUB_DISABLE_PROGRESS_BARS``) when stderr is not a terminal; inherited by the
    processes this one starts (a site's trainer)."""
    if Console(stderr=True).is_terminal:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Both read the switch when imported: tell ones already imported.
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
