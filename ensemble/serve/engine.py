"""The batching engine: concurrent requests become batched calls of one in-process ensemble.

One worker thread owns the ensemble. A request waits in a bounded queue. Top-1 requests (the
paper's setting: routed by their image) decode in one :class:`~ensemble.running_batch.RunningBatch`
(continuous batching): requests that arrive while it generates join it at the next decoding
step, and a request that is done (end of sequence, its own ``max_tokens``, its client gone
or timed out) leaves it at once, freeing its slot. Whatever arrived during a step joins
with one prefill call; while nothing decodes, the worker gathers arrivals into a batch
first -- until no request arrived for ``window_s``, ``8 * window_s`` after the first, or
they fill the free slots.

Other requests (top-k > 1 mixtures, the posterior router for text-only prompts, settings the
runtime refuses) are gathered for that window even while a batch decodes (their call stops
it while it runs), grouped by what one ``generate_tokens`` call must
share (top-k, sampling settings) and run as whole calls between two decoding steps, whose
``batch_size`` lets :mod:`ensemble.scheduling` split them into calls of one expert. Their
tokens reach their handlers as they are chosen through the runtime's ``watch`` hook.

Every request answers exactly as ``RoutedEnsemble.generate`` answers it alone. A seeded
sampled top-1 request draws from its own generator, so it samples as
``generate(..., seed=s)`` does whatever else is in the batch; a seeded mixture runs in a
call of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ensemble.decoding import end_tokens
from ensemble.running_batch import RunningBatch, Unsupported, runs_here
from ensemble.runtime import RoutedEnsemble
from ensemble.scheduling import slices
from ensemble.serve.job import Event, Job, QueueFull
from protocol.errors import AtollError

__all__ = ["Engine"]

log = logging.getLogger(__name__)


class Engine:
    """Runs jobs through one ensemble, batched; see the module docstring.

    Args:
        ensemble: The loaded ensemble (only the worker thread calls it).
        max_queue: Most jobs admitted at once (waiting or generating); more get
            :class:`QueueFull` (HTTP 429).
        max_batch: Most jobs decoding at once in the running batch, and most jobs gathered
            into one ``generate_tokens`` call.
        batch_size: Rows per model call (None: the whole batch); the running batch holds at
            most this many.
        window_s: How long the worker waits for one more job before it closes a gathering
            (``8 * window_s`` at most).
        continuous: Let top-1 jobs join a running batch (False: every job runs in whole
            ``generate_tokens`` calls, as the mixtures do).
    """

    def __init__(
        self,
        ensemble: RoutedEnsemble,
        *,
        max_queue: int = 64,
        max_batch: int = 32,
        batch_size: int | None = None,
        window_s: float = 0.01,
        continuous: bool = True,
    ) -> None:
        self.ensemble = ensemble
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_size = batch_size
        self.window_s = window_s
        self.continuous = continuous
        self.capacity = min(max_batch, batch_size or max_batch)
        self.admitted = 0
        self.batches: list[int] = []  # jobs per gathering admitted, for tests and the log
        self.joins: list[int] = []  # jobs per join of the running batch
        self.steps = 0  # decoding steps of the running batch
        self.stepped = 0  # live rows summed over those steps
        self.busy_s = {"join": 0.0, "step": 0.0, "whole": 0.0}
        self.running = RunningBatch(ensemble)
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._eos = end_tokens(ensemble.tokenizer)
        self._thread = threading.Thread(target=self._work, name="atoll-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        log.info(
            "[Engine] %d joins (%.1f jobs each), %d steps (%.1f rows each), busy %s s",
            len(self.joins),
            sum(self.joins) / max(1, len(self.joins)),
            self.steps,
            self.stepped / max(1, self.steps),
            {k: round(v, 2) for k, v in self.busy_s.items()},
        )

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
        with torch.inference_mode():
            gathering = _Gathering()
            stopping = False
            while not stopping or self.running.rows or gathering.jobs:
                if not stopping:
                    stopping = self._gather(gathering)
                if gathering.jobs and (
                    stopping or gathering.closed(self.window_s, self._free(), self.running.live > 0)
                ):
                    self._admit(gathering)
                if self.running.rows:
                    self._decode_step()
            for job in gathering.jobs:
                job.push(Event("error", error=RuntimeError("the server is shutting down")))

    def _free(self) -> int:
        return self.capacity - self.running.live

    def _gather(self, gathering: _Gathering) -> bool:
        """Takes the jobs that arrived; blocks while there is nothing to do, and for the
        gathering's window while nothing decodes. Returns whether the server is stopping."""
        while True:
            if not gathering.jobs and not self.running.rows:
                timeout: float | None = None  # idle: wait for the first job
            elif self.running.rows or len(gathering.jobs) >= self.max_batch:
                timeout = 0.0  # decoding goes on; take only what is there
            else:
                timeout = gathering.closing(self.window_s) - time.monotonic()
            try:
                if timeout is not None and timeout <= 0:
                    job = self._queue.get_nowait()
                else:
                    job = self._queue.get(timeout=timeout)
            except queue.Empty:
                return False
            if job is None:
                return True
            gathering.add(job)

    def _admit(self, gathering: _Gathering) -> None:
        live = [job for job in gathering.jobs if not job.cancelled.is_set()]
        joining = [job for job in live if self._joins(job)]
        whole = [job for job in live if job not in joining]
        free = max(0, self._free())
        joining, later = joining[:free], joining[free:]
        if self.running.live and not gathering.closed(self.window_s, self.max_batch, False):
            # A whole call stops the running batch while it runs: gather for it first.
            later, whole = later + whole, []
        gathering.restart(later)
        if not joining and not whole:
            return
        self.batches.append(len(joining) + len(whole))
        if joining and not self._join(joining):
            whole = joining + whole
        groups: dict[tuple[Any, ...], list[Job]] = {}
        for job in whole:
            groups.setdefault(job.key(), []).append(job)
        for group in groups.values():
            for part in slices(len(group), self.max_batch):
                self._run(group[part])

    def _joins(self, job: Job) -> bool:
        return self.continuous and runs_here(self.ensemble, job.joining(), job.top_k)

    def _join(self, jobs: list[Job]) -> bool:
        """Jobs into the running batch; False when the experts cannot decode that way."""
        self.joins.append(len(jobs))
        start = time.perf_counter()
        try:
            rows = self.running.join(jobs, [job.joining() for job in jobs])
        except Unsupported as reason:
            log.warning("[Engine] continuous batching is off: %s", reason)
            self.continuous = False
            return False
        except Exception as error:  # one bad join must not take the running batch down
            self._fail(jobs, error)
            return True
        finally:
            self.busy_s["join"] += time.perf_counter() - start
        for row in rows:
            job = row.handle
            job.experts, job.weights = [row.expert], [row.weight]
        return True

    def _decode_step(self) -> None:
        batch = self.running
        self.steps += 1
        self.stepped += batch.live
        start = time.perf_counter()
        try:
            tokens = batch.choose()
            leaving = []
            for row, token in zip(batch.rows, tokens, strict=True):
                if token is None:
                    continue
                job: Job = row.handle
                if self._watch_one(job, token):
                    leaving.append(row)
            batch.leave(leaving)
            for row in leaving:
                self._finish(row.handle)
            batch.step(tokens)
        except Exception as error:  # the server must outlive one failed batch
            jobs = [row.handle for row in batch.rows if row.live]
            batch.clear()
            self._fail(jobs, error)
        self.busy_s["step"] += time.perf_counter() - start

    def _watch_one(self, job: Job, token: int) -> bool:
        """Shows ``job`` its next token; returns whether it is done."""
        if token in self._eos:
            job.ended = True
            return True
        job.tokens.append(token)
        if job.stream:
            self._stream(job)
        return job.cancelled.is_set() or len(job.tokens) >= job.max_tokens

    def _finish(self, job: Job) -> None:
        text = self.ensemble.tokenizer.decode(job.tokens, skip_special_tokens=True)
        self._done(job, text, list(job.tokens), job.experts, job.weights)

    def _done(
        self, job: Job, text: str, token_ids: list[int], experts: list[int], weights: list[float]
    ) -> None:
        rest = text[len(job.sent) :] if text.startswith(job.sent) else ""
        reason = "stop" if job.ended else "length"
        if job.cancelled.is_set() and not job.ended and len(job.tokens) < job.max_tokens:
            reason = "cancelled"
        job.push(
            Event(
                "done",
                text=rest,
                finish_reason=reason,
                token_ids=token_ids,
                experts=experts,
                weights=weights,
            )
        )

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        if not isinstance(error, AtollError):
            log.error("[Engine] %d requests failed", len(jobs), exc_info=error)
        for job in jobs:
            job.push(Event("error", error=error))

    def _run(self, jobs: list[Job]) -> None:
        """Jobs as one ``generate_tokens`` call (mixtures, the posterior, refused settings)."""
        first = jobs[0]
        start = time.perf_counter()
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
        except Exception as error:  # the server must outlive one failed batch
            self._fail(jobs, error)
            return
        finally:
            self.busy_s["whole"] += time.perf_counter() - start
        for i, job in enumerate(jobs):
            self._done(
                job, result.texts[i], result.token_ids[i], result.experts[i], result.weights[i]
            )

    def _watch(self, jobs: list[Job], samples: list[int], tokens: list[int]) -> list[bool]:
        # A job that chose end-of-sequence ends there anyway: no need to stop it.
        return [
            self._watch_one(jobs[sample], token) and not jobs[sample].ended
            for sample, token in zip(samples, tokens, strict=True)
        ]

    def _stream(self, job: Job) -> None:
        text = self.ensemble.tokenizer.decode(job.tokens, skip_special_tokens=True)
        # Hold back a half-decoded character; never resend what the client already has.
        if text.startswith(job.sent) and not text.endswith("\ufffd") and len(text) > len(job.sent):
            job.push(Event("delta", text=text[len(job.sent) :]))
            job.sent = text


@dataclass
class _Gathering:
    """Jobs that arrived and wait to be admitted, with when the first and the latest came."""

    jobs: list[Job] = field(default_factory=list)
    opened: float = 0.0
    arrived: float = 0.0

    def add(self, job: Job) -> None:
        now = time.monotonic()
        if not self.jobs:
            self.opened = now
        self.jobs.append(job)
        self.arrived = now

    def closing(self, window_s: float) -> float:
        """When the gathering closes: ``window_s`` after the latest arrival, ``8 * window_s``
        after the first at most."""
        return min(self.arrived + window_s, self.opened + 8 * window_s)

    def closed(self, window_s: float, free: int, decoding: bool) -> bool:
        """Whether to admit the jobs now: a batch is decoding (they join it at this step),
        they fill the free slots, or the window closed."""
        return (
            decoding or len(self.jobs) >= max(1, free) or time.monotonic() >= self.closing(window_s)
        )

    def restart(self, jobs: list[Job]) -> None:
        """Keeps ``jobs`` waiting (no free slot yet, or a whole call still gathering)."""
        self.jobs = list(jobs)
