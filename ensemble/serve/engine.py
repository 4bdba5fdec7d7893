"""The batching engine: concurrent requests become batched calls of one in-process ensemble.

One worker thread owns the ensemble. A request waits in a bounded queue; the worker takes the
first waiting request and gathers more while they keep coming: the batch closes once no
request arrived for ``window_s``, after ``8 * window_s`` in all, or at ``max_batch``
(clients answered together send their next requests together, spread over the time the
server takes to read them), groups them by what one ``generate_tokens`` call must share (top-k, sampling
settings) and runs each group as one call, whose ``batch_size`` lets
:mod:`ensemble.scheduling` split it into calls of one expert. Each request's tokens reach its
handler as they are chosen (the runtime's ``watch`` hook), which also stops a request at its
own ``max_tokens``, when its client has gone, or past its deadline.

A seeded sampled request runs alone, so that it samples exactly as
``RoutedEnsemble.generate(..., seed=s)`` does for that one prompt; greedy requests and
unseeded sampled ones share calls.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ensemble.runtime import RoutedEnsemble
from protocol.errors import AtollError

__all__ = ["Engine", "Event", "Job", "QueueFull"]

log = logging.getLogger(__name__)


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

    def key(self) -> tuple[Any, ...]:
        """Jobs with one key can share a ``generate_tokens`` call."""
        if not self.do_sample:
            return (self.top_k, False)
        if self.seed is not None:
            return (self.top_k, True, id(self))  # alone: sampled exactly as generate samples
        return (self.top_k, True, self.temperature, self.top_p)

    def push(self, event: Event) -> None:
        """Hands ``event`` to the job's handler on its event loop (from any thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Runs jobs through one ensemble, batched; see the module docstring.

    Args:
        ensemble: The loaded ensemble (only the worker thread calls it).
        max_queue: Most jobs admitted at once (waiting or generating); more get
            :class:`QueueFull` (HTTP 429).
        max_batch: Most jobs gathered into one batch.
        batch_size: ``generate_tokens``'s rows per model call (None: the whole batch).
        window_s: How long the worker waits for one more job before it closes a batch (a
            batch waits ``8 * window_s`` at most).
    """

    def __init__(
        self,
        ensemble: RoutedEnsemble,
        *,
        max_queue: int = 64,
        max_batch: int = 32,
        batch_size: int | None = None,
        window_s: float = 0.01,
    ) -> None:
        self.ensemble = ensemble
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_size = batch_size
        self.window_s = window_s
        self.admitted = 0
        self.batches: list[int] = []  # jobs per batch taken, for tests and the log
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        eos = ensemble.tokenizer.eos_token_id
        self._eos = {int(eos)} if eos is not None else set()
        self._thread = threading.Thread(target=self._work, name="atoll-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Admits ``job``. Raises QueueFull when ``max_queue`` jobs are in flight."""
        with self._lock:
            if self.admitted >= self.max_queue:
                raise QueueFull(
                    f"{self.admitted} requests in flight (--max-queue {self.max_queue})"
                )
            self.admitted += 1
        self._queue.put(job)

    def release(self, job: Job) -> None:
        """Frees ``job``'s slot (once): it finished, failed, timed out or its client left."""
        with self._lock:
            if not job.released:
                job.released = True
                self.admitted -= 1

    def cancel(self, job: Job) -> None:
        """Stops ``job`` at its next token (or before it starts) and frees its slot now."""
        job.cancelled.set()
        self.release(job)

    # -- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            closing = time.monotonic() + 8 * self.window_s
            stop = False
            while len(batch) < self.max_batch:
                wait = min(self.window_s, closing - time.monotonic())
                try:
                    job = self._queue.get(timeout=max(0.0, wait))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            live = [job for job in batch if not job.cancelled.is_set()]
            self.batches.append(len(live))
            groups: dict[tuple[Any, ...], list[Job]] = {}
            for job in live:
                groups.setdefault(job.key(), []).append(job)
            for group in groups.values():
                self._run(group)
            if stop:
                return

    def _run(self, jobs: list[Job]) -> None:
        first = jobs[0]
        try:
            result = self.ensemble.generate_tokens(
                [job.image for job in jobs],
                [job.prompt for job in jobs],
                max(job.max_tokens for job in jobs),
                top_k=first.top_k,
                do_sample=first.do_sample,
                temperature=first.temperature,
                top_p=first.top_p,
                seed=first.seed,
                batch_size=self.batch_size,
                watch=lambda samples, tokens: self._watch(jobs, samples, tokens),
            )
        except AtollError as error:
            for job in jobs:
                job.push(Event("error", error=error))
            return
        except Exception as error:  # the server must outlive one failed batch
            log.exception("[Engine] a batch of %d failed", len(jobs))
            for job in jobs:
                job.push(Event("error", error=error))
            return
        for i, job in enumerate(jobs):
            text = result.texts[i]
            rest = text[len(job.sent) :] if text.startswith(job.sent) else ""
            reason = "stop" if job.ended else "length"
            if job.cancelled.is_set() and not job.ended and len(job.tokens) < job.max_tokens:
                reason = "cancelled"
            job.push(
                Event(
                    "done",
                    text=rest,
                    finish_reason=reason,
                    token_ids=result.token_ids[i],
                    experts=result.experts[i],
                    weights=result.weights[i],
                )
            )

    def _watch(self, jobs: list[Job], samples: list[int], tokens: list[int]) -> list[bool]:
        stop = []
        for sample, token in zip(samples, tokens, strict=True):
            job = jobs[sample]
            if token in self._eos:
                job.ended = True
                stop.append(False)  # it ends here anyway
                continue
            job.tokens.append(token)
            if job.stream:
                self._stream(job)
            stop.append(job.cancelled.is_set() or len(job.tokens) >= job.max_tokens)
        return stop

    def _stream(self, job: Job) -> None:
        text = self.ensemble.tokenizer.decode(job.tokens, skip_special_tokens=True)
        # Hold back a half-decoded character; never resend what the client already has.
        if text.startswith(job.sent) and not text.endswith("\ufffd") and len(text) > len(job.sent):
            job.push(Event("delta", text=text[len(job.sent) :]))
            job.sent = text
