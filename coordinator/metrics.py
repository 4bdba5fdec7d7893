"""Prometheus metrics of a running coordinator (`serve --metrics-listen HOST:PORT`).

Names follow Prometheus conventions, ``atoll_<thing>_<unit>``, ``_total`` for counters, and
labels with few values (method, code, phase, kind): never a site name, since sites can number
thousands. RPC counts and latencies come from a gRPC server interceptor; everything that is
federation state (sites by phase, open uploads, accepted experts, the audit log, certificate
expiries) is read from the store at scrape time, so it is never stale and survives restarts.

::

    atoll_rpc_requests_total{method, code}       counter
    atoll_rpc_duration_seconds{method, code}     histogram
    atoll_upload_received_bytes_total            counter (UploadChunk payload bytes)
    atoll_sites{phase}                           gauge (enrolled sites by last phase)
    atoll_sites_silent / atoll_sites_revoked     gauges
    atoll_uploads_in_progress                    gauge (open upload sessions)
    atoll_experts / atoll_experts_accepted       gauges (plan size, accepted experts)
    atoll_audit_log_events                       gauge
    atoll_audit_checkpoint_timestamp_seconds     gauge (the latest signed checkpoint)
    atoll_certificate_expiry_timestamp_seconds{kind}   ca, server, site (the soonest site)
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator import status
from coordinator.state import StateDir
from coordinator.store import Store
from protocol.errors import FailedPrecondition
from protocol.messages import PHASES

# Upload chunks and downloads of large experts run for minutes: the top buckets matter.
LATENCY_BUCKETS = (0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class FederationCollector(Collector):
    """Federation state as gauges, read from the store at each scrape."""

    def __init__(self, state: StateDir, store: Store) -> None:
        self.state, self.store = state, store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        document = status.status_document(self.state, self.store)
        by_phase = Tally(row["phase"] for row in document["sites"])
        sites = GaugeMetricFamily("atoll_sites", "Enrolled sites by last phase", labels=["phase"])
        for phase in ("enrolled", *PHASES):
            sites.add_metric([phase], by_phase.get(phase, 0))
        yield sites
        yield _gauge(
            "atoll_sites_silent", "Sites that missed heartbeats", _count(document, "silent")
        )
        yield _gauge("atoll_sites_revoked", "Revoked sites", _count(document, "revoked"))
        open_uploads = sum(1 for u in document["uploads"] if u["state"] == "open")
        yield _gauge("atoll_uploads_in_progress", "Open upload sessions", open_uploads)
        experts = document["experts"]
        yield _gauge("atoll_experts", "Expert slots in the partition plan", len(experts))
        accepted = sum(1 for e in experts if e["phase"] == "accepted")
        yield _gauge("atoll_experts_accepted", "Experts with an accepted upload", accepted)
        yield _gauge(
            "atoll_audit_log_events", "Events in the audit log", document["audit"]["events"]
        )
        at = document["audit"]["last_checkpoint_at"]
        if at is not None:
            yield _gauge(
                "atoll_audit_checkpoint_timestamp_seconds",
                "When the latest audit checkpoint was signed",
                datetime.fromisoformat(at).timestamp(),
            )
        expiry = GaugeMetricFamily(
            "atoll_certificate_expiry_timestamp_seconds",
            "notAfter of the CA, the serving certificate and the soonest-expiring site",
            labels=["kind"],
        )
        certificates = document["certificates"]
        for kind, value in (
            ("ca", certificates["ca_expires_at"]),
            ("server", certificates["server_expires_at"]),
            ("site", _soonest(document)),
        ):
            if value is not None:
                expiry.add_metric([kind], value)
        yield expiry


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _count(document: dict[str, Any], flag: str) -> int:
    return sum(1 for row in document["sites"] if row[flag])


def _soonest(document: dict[str, Any]) -> float | None:
    live = [
        row["certificate_expires_at"]
        for row in document["sites"]
        if not row["revoked"] and row["certificate_expires_at"] is not None
    ]
    return min(live) if live else None


class Metrics:
    """One registry per coordinator (tests run several in one process)."""

    def __init__(self, state: StateDir, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "atoll_rpc_requests_total",
            "RPCs handled, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "atoll_rpc_duration_seconds",
            "RPC handling time, by method and status code",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.received = Counter(
            "atoll_upload_received_bytes",
            "Bytes of upload chunks received",
            registry=self.registry,
        )
        self.registry.register(FederationCollector(state, store))

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.latency.labels(method, code.name).observe(seconds)

    def interceptor(self) -> grpc.ServerInterceptor:
        return _MetricsInterceptor(self)


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Times every RPC and reads its final status code from the servicer context."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self.metrics

        def done(context: grpc.ServicerContext, started: float, failed: bool) -> None:
            code = _final_code(context, failed)
            metrics.observe(method, code, time.perf_counter() - started)

        def wrap_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                started, failed = time.perf_counter(), True
                try:
                    if handler.request_streaming:
                        request = _counting(request, metrics)
                    result = fn(request, context)
                    failed = False
                    return result
                finally:
                    done(context, started, failed)

            return run

        def wrap_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started, failed = time.perf_counter(), True
                try:
                    yield from fn(request, context)
                    failed = False
                finally:
                    done(context, started, failed)

            return run

        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **codec)
        return handler  # no stream-stream RPCs in the protocol


def _final_code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    # Set by abort() or set_code(); None when the call just returned (grpc-stubs lacks it).
    code = getattr(context, "code", lambda: None)()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


def _counting(requests: Iterable[Any], metrics: Metrics) -> Iterator[Any]:
    for request in requests:
        data = getattr(request, "data", b"")
        if data:
            metrics.received.inc(len(data))
        yield request


@dataclass(frozen=True)
class Exporter:
    port: int
    stop: Callable[[], None]


def start_exporter(metrics: Metrics, listen: str) -> Exporter:
    """Serves ``/metrics`` on ``listen`` (HOST:PORT; port 0 picks a free one)."""
    host, _, port = listen.rpartition(":")
    try:
        server, thread = start_http_server(int(port), host or "0.0.0.0", registry=metrics.registry)
    except (OSError, ValueError) as error:
        raise FailedPrecondition(f"--metrics-listen {listen}: cannot listen ({error})") from error

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return Exporter(server.server_port, stop)
