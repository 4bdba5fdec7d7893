"""The gRPC servers that `coordinator serve` runs: their ports, credentials, thread pools and
keepalive, and the serve loop (the RPCs themselves: :mod:`coordinator.servicer`).

Two TLS ports: PORT requires mutual TLS with a certificate issued by this federation's CA;
PORT+1 (``--enrol-listen``) needs only server TLS, for Enroll with a one-time token. Both serve
the same :class:`coordinator.servicer.FederationServicer`, which identifies each caller.

Each port is a gRPC server of its own, with its own thread pool and :class:`CallLimits`
(:mod:`coordinator.call_limits`), so unauthenticated callers of the enrolment port can never
take a thread that a site's heartbeat or upload needs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from coordinator import (
    certificates,
    sites,
    upload,
)
from coordinator.ca import CertificateAuthority
from coordinator.call_limits import (
    ENROL_LIMITS,
    SITE_LIMITS,
    CallGuard,
    CallLimits,
    peer_address,
    peer_certificate,
)
from coordinator.health import HealthServicer, add_health
from coordinator.metrics import Metrics
from coordinator.operations import OperationsOptions, start_operations
from coordinator.servicer import Coordinator, FederationServicer
from coordinator.state import StateDir
from protocol import federation_pb2_grpc as pb_grpc
from protocol.x509 import (
    load_private_key,
    new_p256_key,
    private_key_pem,
    write_private,
    write_public,
)

log = logging.getLogger("atoll.coordinator")
MAX_MESSAGE_BYTES = 16 << 20
# The serving certificate is issued anew at start-up when less than this is left of it.
SERVER_RENEW_SECONDS = 30 * 86400


def server_credentials(
    state: StateDir, ca: CertificateAuthority, require_client_auth: bool
) -> grpc.ServerCredentials:
    """TLS with the coordinator's certificate; with ``require_client_auth`` the peer must
    present a certificate issued by the federation CA (every call but Enroll)."""
    expires = certificates.file_expires_at(state.server_cert)
    if expires is None or expires - time.time() < SERVER_RENEW_SECONDS:
        key = new_p256_key()
        cert = ca.issue_server_certificate(key.public_key(), extra_dns=["localhost"])
        write_private(state.server_key, private_key_pem(key))
        write_public(state.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    key_pem = private_key_pem(load_private_key(state.server_key))
    ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    # The CA travels in the chain so a site can check it against its token's pin.
    chain = state.server_cert.read_bytes() + ca_pem
    return grpc.ssl_server_credentials(
        [(key_pem, chain)],
        root_certificates=ca_pem if require_client_auth else None,
        require_client_auth=require_client_auth,
    )


def enrol_address(listen: str) -> str:
    """The enrolment port's default: the mutual-TLS port + 1 (0 stays 0: any free port)."""
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + 1 if int(port) else 0}"


@dataclass(frozen=True)
class Bound:
    """The two servers, bound and not yet started."""

    server: grpc.Server  # mutual TLS: every site and reader call
    enrol_server: grpc.Server  # server TLS only: Enroll (a caller has no certificate yet)
    port: int
    enrol_port: int
    guard: CallGuard
    enrol_guard: CallGuard
    metrics: Metrics  # RPCs of both servers; federation state at scrape time
    health: HealthServicer  # grpc.health.v1 on both ports

    def start(self) -> None:
        self.server.start()
        self.enrol_server.start()

    def stop(self, grace: float | None) -> None:
        """Stops both, letting calls in flight finish for up to ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        done = (self.enrol_server.stop(grace), self.server.stop(grace))
        for event in done:
            event.wait()


# HTTP/2 keepalive: the server notices a peer that vanished (a blackholed network) within
# ~80 s, and accepts the sites' own pings (every 30 s) without calling them abusive.
_KEEPALIVE: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 5),
]
# The enrolment port serves anyone: a connection lives a minute at most, a TLS handshake
# gets 10 s, and one connection carries at most 4 calls.
_ENROL_CONNECTIONS: list[tuple[str, Any]] = [
    ("grpc.max_connection_idle_ms", 30_000),
    ("grpc.max_connection_age_ms", 60_000),
    ("grpc.max_connection_age_grace_ms", 10_000),
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_concurrent_streams", 4),
]


def _new_server(
    limits: CallLimits, guard: CallGuard, metrics: Metrics, extra: list[tuple[str, Any]]
) -> grpc.Server:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # HTTP/2 frames of up to 16 MiB instead of 16 KiB: ~20% more upload throughput here.
        ("grpc.http2.max_frame_size", (1 << 24) - 1),
        ("grpc.so_reuseport", 0),
        *_KEEPALIVE,
        *extra,
    ]
    # As many threads as calls admitted: a call is refused at once, never queued behind
    # calls that may be waiting on their peers.
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.max_calls),
        # Metrics outermost, so calls the guard refuses are counted too.
        interceptors=[metrics.interceptor(), guard],
        options=options,
        maximum_concurrent_rpcs=limits.max_calls,
    )


def build_server(
    coordinator: Coordinator,
    listen: str,
    enrol_listen: str | None = None,
    limits: CallLimits = SITE_LIMITS,
    enrol_limits: CallLimits = ENROL_LIMITS,
) -> Bound:
    """The mutual-TLS server on ``listen`` and the enrolment server, bound, not started.

    gRPC's Python API can either require client certificates or not ask for them, so Enroll
    gets a port (and server) of its own; the same servicer runs on both and
    ``Coordinator.caller`` refuses every call but Enroll that arrives without a federation
    certificate.
    """
    servicer = FederationServicer(coordinator)
    state, ca = coordinator.state, coordinator.ca
    guard = CallGuard(limits, peer=peer_certificate, name="sites")
    metrics = Metrics(coordinator.state, coordinator.store)
    server = _new_server(limits, guard, metrics, [])
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_secure_port(listen, server_credentials(state, ca, True))
    enrol_guard = CallGuard(enrol_limits, peer=peer_address, name="enrolment")
    enrol_server = _new_server(enrol_limits, enrol_guard, metrics, _ENROL_CONNECTIONS)
    pb_grpc.add_FederationServicer_to_server(servicer, enrol_server)
    health = add_health(server, enrol_server)
    enrol_target = enrol_listen or enrol_address(listen)
    enrol_port = enrol_server.add_secure_port(enrol_target, server_credentials(state, ca, False))
    if port == 0 or enrol_port == 0:
        raise OSError(f"could not listen on {listen} and {enrol_target}")
    return Bound(server, enrol_server, port, enrol_port, guard, enrol_guard, metrics, health)


PRUNE_EVERY = 3600.0  # seconds between sweeps for abandoned upload sessions


def _prune_uploads(coordinator: Coordinator, stop: threading.Event) -> None:
    """Deletes abandoned and rejected upload sessions' files, hourly, until ``stop``."""
    while not stop.is_set():
        try:
            upload.prune(coordinator.state, coordinator.store, coordinator.quota)
        except Exception:  # a failed sweep is retried at the next; the server goes on
            log.exception("[Uploads] pruning abandoned uploads failed")
        stop.wait(PRUNE_EVERY)


def serve(
    state: StateDir,
    listen: str,
    enrol_listen: str | None = None,
    heartbeat_seconds: int = sites.HEARTBEAT_SECONDS,
    ready: Callable[[Bound], None] | None = None,
    operations: OperationsOptions | None = None,
) -> None:
    """Runs the coordinator until SIGINT/SIGTERM, then drains in-flight calls."""
    coordinator = Coordinator.open(state, heartbeat_seconds)
    bound = build_server(coordinator, listen, enrol_listen)
    stop_operations = start_operations(
        state, coordinator.store, bound.metrics, operations or OperationsOptions()
    )
    bound.start()
    log.info(
        "[Coordinator] federation %s serving on port %d (mutual TLS) and %d (enrolment)",
        coordinator.federation,
        bound.port,
        bound.enrol_port,
    )
    if ready is not None:
        ready(bound)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=_prune_uploads, args=(coordinator, stop), daemon=True).start()
    stop.wait()
    log.info("[Coordinator] shutting down")
    bound.stop(grace=5)
    stop_operations()
    coordinator.store.close()
