"""The one retry loop: how a site (or a reader) waits out a coordinator that cannot answer.

Every call is idempotent on the coordinator's side, so transient failures are retried by
:class:`Retry` (capped exponential backoff with jitter, each retry logged with its reason, a
give-up time, and a stop event that SIGTERM/SIGINT set to end waiting at once). Transient: the
coordinator down, restarting or unreachable (UNAVAILABLE, a missed deadline, a broken stream),
a limit reached (RESOURCE_EXHAUSTED: too many calls, its disk full), a conflict (ABORTED), and
any status that carries the coordinator's ``atoll-retry-after`` hint. Everything else is the
coordinator's word (bad token, permission, bad input...) and raises at once as its
:mod:`protocol.errors` class.

Example::

    retry = Retry(give_up_after=600)
    reply = retry.run("GetAssignment", lambda: stub.GetAssignment(request, timeout=30))
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from protocol.errors import Interrupted, Unavailable, error_for_code_name

log = logging.getLogger("atoll.site")
T = TypeVar("T")
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}
RETRY_AFTER_KEY = "atoll-retry-after"  # the coordinator's hint: transient, wait this long


def retry_hint(error: grpc.RpcError) -> float | None:
    """Seconds to wait before trying again when ``error`` is transient, else None."""
    trailers: tuple[tuple[str, str | bytes], ...] = ()
    if isinstance(error, grpc.Call):
        trailers = tuple(error.trailing_metadata() or ())
    for key, value in trailers:
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0
    return 0.0 if error.code() in RETRYABLE else None


def raise_unless_transient(error: grpc.RpcError) -> None:
    """Raises the coordinator's answer as a domain error; returns for transient failures, so
    a resumable transfer can tell "try again" from "no"."""
    if retry_hint(error) is not None:
        return
    raise error_for_code_name(error.code().name, error.details() or error.code().name) from None


@dataclass
class Retry:
    """How a site waits out transient failures: the one retry loop every call goes through.

    Attributes:
        initial: First wait (seconds); each failure doubles it, up to ``maximum``. Every wait
            is drawn between half and all of it (jitter), so a thousand sites that lost the
            coordinator together do not come back together.
        give_up_after: Seconds of failing (from the first failure of a call) before raising
            Unavailable; None retries for as long as it takes.
        stop: Set (by SIGTERM/SIGINT) to end a wait at once: the call raises Interrupted.
    """

    initial: float = 0.5
    maximum: float = 30.0
    give_up_after: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def wait(self, seconds: float) -> None:
        """Sleeps ``seconds`` unless stopped first (then raises Interrupted)."""
        if self.stop.wait(seconds):
            raise Interrupted("stopped while waiting to retry")

    def run(self, what: str, call: Callable[[], T]) -> T:
        """Calls ``call`` until it succeeds, retrying transient failures."""
        delay = self.initial
        started = time.monotonic()
        attempt = 0
        while True:
            if self.stop.is_set():
                raise Interrupted(f"{what}: stopped")
            try:
                return call()
            except grpc.RpcError as error:
                code = error.code()
                hint = retry_hint(error)
                if hint is None or self.stop.is_set():
                    if self.stop.is_set():
                        raise Interrupted(f"{what}: stopped") from None
                    raise error_for_code_name(code.name, error.details() or code.name) from None
                reason = f"{code.name} ({error.details()})"
            except Unavailable as error:
                hint, reason = 0.0, str(error)
            except ValueError:
                if self.stop.is_set():  # the channel was closed by interrupt() meanwhile
                    raise Interrupted(f"{what}: stopped") from None
                raise
            attempt += 1
            elapsed = time.monotonic() - started
            if self.give_up_after is not None and elapsed >= self.give_up_after:
                raise Unavailable(
                    f"{what}: coordinator unreachable for {elapsed:.0f}s ({attempt} attempts), "
                    f"giving up: {reason}"
                )
            pause = max(hint, delay * random.uniform(0.5, 1.0))
            if self.give_up_after is not None:  # the last wait ends at the give-up time
                pause = min(pause, self.give_up_after - elapsed)
            log.warning("[site] %s failed: %s; retry %d in %.1fs", what, reason, attempt, pause)
            self.wait(pause)
            delay = min(delay * 2, self.maximum)
