"""One request on its way through the engine (:mod:`ensemble.serve.engine`), and what its
handler hears back."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ensemble.running_batch import Joining

__all__ = ["Event", "Job", "QueueFull"]


class QueueFull(Exception):
    """Every slot of the engine's bounded queue is taken."""


@dataclass(frozen=True)
class Event:
    """What a job's handler receives: ``delta`` (text streamed so far), then one ``done``
    (``finish_reason``, the final text's last piece, routing) or ``error``."""

    kind: str
    text: str = ""
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    error: Exception | None = None


@dataclass(eq=False)
class Job:
    """One request on its way through the engine."""

    image: Image.Image | None
    prompt: str
    max_tokens: int
    top_k: int | None
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    ended: bool = False  # chose end-of-sequence
    sent: str = ""  # text streamed so far
    released: bool = False
    experts: list[int] = field(default_factory=list)  # its routing, once it joined
    weights: list[float] = field(default_factory=list)

    def key(self) -> tuple[Any, ...]:
        """Jobs with one key can share a ``generate_tokens`` call."""
        if not self.do_sample:
            return (self.top_k, False)
        if self.seed is not None:
            return (self.top_k, True, id(self))  # alone: sampled exactly as generate samples
        return (self.top_k, True, self.temperature, self.top_p)

    def joining(self) -> Joining:
        """The job as a prompt that joins a running batch."""
        return Joining(
            self.image, self.prompt, self.do_sample, self.temperature, self.top_p, self.seed
        )

    def push(self, event: Event) -> None:
        """Hands ``event`` to the job's handler on its event loop (from any thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)
