"""Limits on every gRPC call the coordinator serves: how long it may wait on the peer, and
how many calls one peer may hold at once.

gRPC's Python server gives every call a pool thread *before* the request body arrives, and
waits for that body (or the next message of a stream, or a reader to take the next response)
with no limit of its own: a few peers that open calls and send nothing would hold every
thread. :class:`CallGuard` (a server interceptor) closes that hole:

* every handler is served in its streaming-request form, so the guard holds the call's
  context from the first moment and reads the request itself;
* a watchdog cancels a call that waits on its peer longer than ``idle_timeout``: for a unary
  request's body, for each message of a stream (``UploadChunk``), for the reader to accept each
  response message (``DownloadArtifact``); work the coordinator itself does is not timed;
* a peer (the certificate's identity on the mutual-TLS port, the IP address on the enrolment
  port) holding ``per_peer`` calls has the next refused at once with RESOURCE_EXHAUSTED and an
  ``atoll-retry-after`` trailer (sites treat it as "try again later").

The server caps the calls it runs at all with gRPC's ``maximum_concurrent_rpcs`` (beyond it a
call is refused at once, never queued), and enrolment runs on a server of its own, so
unauthenticated callers can never take a thread a site needs (:mod:`coordinator.server`).

Example::

    guard = CallGuard(CallLimits(idle_timeout=10, per_peer=2), peer=peer_address)
    server = grpc.server(pool, interceptors=[guard], maximum_concurrent_rpcs=8)
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from protocol.retry import RETRY_AFTER_KEY

log = logging.getLogger("atoll.coordinator")

# Only this service's calls are timed; a health Watch may rightly stay silent for hours.
GUARDED_PREFIX = "/atoll."


@dataclass(frozen=True)
class CallLimits:
    """What one server allows; :data:`SITE_LIMITS` and :data:`ENROL_LIMITS` are the defaults.

    Attributes:
        idle_timeout: Seconds a call may wait on its peer at a time (request body, next
            stream message, the reader accepting the next response message).
        per_peer: Calls one peer may have running at once.
        max_calls: Calls the server runs at once (its thread pool); more are refused.
    """

    idle_timeout: float
    per_peer: int
    max_calls: int


# Sites: three image downloads (site_agent/images.py), an upload stream and a heartbeat at
# once, with room for resumed calls whose predecessors the server has not yet seen die. 256 calls at once: 1,000 sites beating
# every 10 s need a handful; a burst of every site at once (after a restart) is shed with
# RESOURCE_EXHAUSTED, which sites retry with jitter (benchmarks/load.py).
SITE_LIMITS = CallLimits(idle_timeout=60.0, per_peer=8, max_calls=256)
# Enrolment: one small request per site, once; nothing legitimate waits seconds on it.
ENROL_LIMITS = CallLimits(idle_timeout=10.0, per_peer=2, max_calls=8)


def peer_address(context: grpc.ServicerContext) -> str:
    """The caller's IP address (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``)."""
    peer = context.peer()
    return peer.rpartition(":")[0] or peer


def peer_certificate(context: grpc.ServicerContext) -> str:
    """The identity the caller's certificate names (its SPIFFE URI), else its address."""
    identities = context.peer_identities()
    if identities:
        return b",".join(identities).decode(errors="replace")
    return peer_address(context)


class _Watchdog:
    """Cancels calls whose wait on the peer ran past its deadline (one thread per server)."""

    def __init__(self, name: str) -> None:
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, grpc.ServicerContext, str]] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-watchdog", daemon=True)
        self._thread.start()

    def new_id(self) -> int:
        return next(self._ids)

    def arm(self, call: int, seconds: float, context: grpc.ServicerContext, what: str) -> None:
        with self._lock:
            self._due[call] = (time.monotonic() + seconds, context, what)

    def disarm(self, call: int) -> None:
        with self._lock:
            self._due.pop(call, None)

    def _run(self) -> None:
        while True:
            self._wake.wait(0.25)
            now = time.monotonic()
            with self._lock:
                expired = [(k, v) for k, v in self._due.items() if v[0] <= now]
                for key, _ in expired:
                    del self._due[key]
            for _, (_, context, what) in expired:
                log.warning("[CallGuard] %s: cancelled", what)
                context.cancel()


@dataclass
class _Call:
    """One admitted call: reads its requests and sends its responses under the idle timeout."""

    name: str
    context: grpc.ServicerContext
    watchdog: _Watchdog
    idle: float
    id: int

    def next(self, requests: Iterator[Any]) -> Any:
        what = f"{self.name}: no request message for {self.idle:.0f}s"
        self.watchdog.arm(self.id, self.idle, self.context, what)
        try:
            return next(requests)
        finally:
            self.watchdog.disarm(self.id)

    def one(self, requests: Iterator[Any]) -> Any:
        try:
            return self.next(requests)
        except StopIteration:
            self.context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{self.name} expects one request message"
            )
            raise

    def each(self, requests: Iterator[Any]) -> Iterator[Any]:
        while True:
            try:
                request = self.next(requests)
            except StopIteration:
                return
            yield request

    def send(self, responses: Iterator[Any]) -> Iterator[Any]:
        what = f"{self.name}: the reader took no data for {self.idle:.0f}s"
        for response in responses:
            # gRPC sends a message before it asks for the next one: a reader that stops
            # reading holds us at this yield (HTTP/2 flow control).
            self.watchdog.arm(self.id, self.idle, self.context, what)
            yield response
            self.watchdog.disarm(self.id)


Handler = Callable[[Any, grpc.ServicerContext], Any]


class CallGuard(grpc.ServerInterceptor):
    """Applies :class:`CallLimits` to every call of the guarded services."""

    def __init__(
        self,
        limits: CallLimits,
        peer: Callable[[grpc.ServicerContext], str] = peer_address,
        name: str = "server",
    ) -> None:
        self.limits = limits
        self._peer = peer
        self._lock = threading.Lock()
        self._active: Counter[str] = Counter()
        self._watchdog = _Watchdog(name)

    def active(self, peer: str) -> int:
        """Calls ``peer`` has running now."""
        with self._lock:
            return self._active[peer]

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(GUARDED_PREFIX):
            return handler
        name = method.rpartition("/")[2]
        inner: Handler | None = handler.unary_unary or handler.stream_unary
        if inner is not None:
            # A unary request arrives through the same request stream, so both become stream-unary
            single = handler.unary_unary is not None

            def wrap(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                call = self._admit(name, context)
                return inner(call.one(requests) if single else call.each(requests), context)

            return grpc.stream_unary_rpc_method_handler(
                wrap,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            replies: Handler = handler.unary_stream

            def wrap_replies(
                requests: Iterator[Any], context: grpc.ServicerContext
            ) -> Iterator[Any]:
                call = self._admit(name, context)
                yield from call.send(replies(call.one(requests), context))

            return grpc.stream_stream_rpc_method_handler(
                wrap_replies,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # bidirectional streams: none in this protocol

    def _admit(self, name: str, context: grpc.ServicerContext) -> _Call:
        """Counts the call against its peer until it ends (however it ends). A peer that
        already holds ``per_peer`` calls is refused at once."""
        peer = self._peer(context)
        with self._lock:
            refused = self._active[peer] >= self.limits.per_peer
            if not refused:
                self._active[peer] += 1
        if refused:
            log.warning(
                "[CallGuard] %s from %s refused: %d calls already running",
                name,
                peer,
                self.limits.per_peer,
            )
            context.set_trailing_metadata(((RETRY_AFTER_KEY, "5"),))
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.limits.per_peer} calls from this peer are already running; try again later",
            )
        call = _Call(
            name, context, self._watchdog, self.limits.idle_timeout, self._watchdog.new_id()
        )

        def release() -> None:
            self._watchdog.disarm(call.id)
            with self._lock:
                self._active[peer] -= 1
                if not self._active[peer]:
                    del self._active[peer]

        if not context.add_callback(release):
            release()  # the call ended already
        return call
