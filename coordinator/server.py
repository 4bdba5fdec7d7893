"""The gRPC server: thin servicers over the plain functions of the coordinator package.

Two TLS ports: PORT requires mutual TLS with a certificate issued by this federation's CA, and
the caller is whoever that certificate names (its SPIFFE URI SAN), never a request field;
PORT+1 (``--enrol-listen``) needs only server TLS, for Enroll with a one-time token.

Each port is a gRPC server of its own, with its own thread pool and :class:`CallLimits`
(:mod:`coordinator.call_limits`), so unauthenticated callers of the enrolment port can never
take a thread that a site's heartbeat or upload needs.

Errors: a domain error (:mod:`protocol.errors`) is answered with its status and message; a full
disk with RESOURCE_EXHAUSTED "coordinator disk full" and a retry hint; anything else with
INTERNAL and no detail (the traceback is logged here, never sent: it names server paths).
"""

from __future__ import annotations

import errno
import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from cryptography.hazmat.primitives import serialization

from coordinator import (
    acceptance,
    artifacts,
    assignment,
    audit,
    certificates,
    enrolment,
    release,
    sites,
    upload,
)
from coordinator.ca import CertificateAuthority
from coordinator.call_limits import (
    ENROL_LIMITS,
    RETRY_AFTER_KEY,
    SITE_LIMITS,
    CallGuard,
    CallLimits,
    peer_address,
    peer_certificate,
)
from coordinator.federation import load_authority
from coordinator.health import HealthServicer, add_health
from coordinator.images import is_image_name, open_image
from coordinator.metrics import Metrics
from coordinator.operations import OperationsOptions, start_operations
from coordinator.state import StateDir
from coordinator.store import SiteRecord, Store
from protocol import federation_pb2 as pb
from protocol import federation_pb2_grpc as pb_grpc
from protocol import serde
from protocol.errors import AtollError, PermissionDenied, ResourceExhausted, Unauthenticated
from protocol.identity import parse_spiffe_id, reader_record_name
from protocol.x509 import (
    load_certificate,
    load_private_key,
    new_p256_key,
    private_key_pem,
    serial_hex,
    signed_by,
    uri_sans,
    write_private,
    write_public,
)

log = logging.getLogger("atoll.coordinator")
T = TypeVar("T")
MAX_MESSAGE_BYTES = 16 << 20
# The serving certificate is issued anew at start-up when less than this is left of it.
SERVER_RENEW_SECONDS = 30 * 86400


@dataclass
class Coordinator:
    """Everything a request handler needs, built once per server."""

    state: StateDir
    store: Store
    ca: CertificateAuthority
    writer: upload.UploadWriter
    auditor: audit.Auditor
    acceptance_checks: tuple[upload.AcceptanceCheck, ...] = ()
    heartbeat_seconds: int = sites.HEARTBEAT_SECONDS
    quota: upload.UploadQuota = field(default_factory=upload.UploadQuota)

    @classmethod
    def open(cls, state: StateDir, heartbeat_seconds: int = sites.HEARTBEAT_SECONDS) -> Coordinator:
        """Opens the state directory; uploads are accepted only with a valid signature and
        provenance (:func:`coordinator.acceptance.provenance_check`)."""
        store = state.open_store()
        store.set_meta("heartbeat_seconds", str(heartbeat_seconds))
        writer = upload.UploadWriter(state, store)
        ca = load_authority(state)
        ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
        checks = (acceptance.provenance_check(store, ca.federation, ca_pem),)
        auditor = audit.Auditor.open(state, store)
        return cls(state, store, ca, writer, auditor, checks, heartbeat_seconds)

    @property
    def federation(self) -> str:
        return self.ca.federation

    def identity(self, context: grpc.ServicerContext) -> tuple[str, SiteRecord]:
        """``(role, record)`` of the enrolled, current, unrevoked site or reader whose
        certificate made this call."""
        # grpc-stubs types the values as bytes; gRPC returns a list of bytes per property.
        pems = cast(list[bytes], context.auth_context().get("x509_pem_cert"))
        if not pems:
            raise Unauthenticated(
                f"this call needs mutual TLS with a certificate of federation "
                f"{self.federation!r}; enrol first (`site-agent join` or `atoll download` "
                "with a token)"
            )
        cert = load_certificate(pems[0], "peer certificate")
        if not signed_by(cert, self.ca.cert):
            raise Unauthenticated("peer certificate was not issued by this federation's CA")
        uris = uri_sans(cert)
        if len(uris) != 1:
            raise Unauthenticated(f"peer certificate must carry one SPIFFE URI SAN, has {uris}")
        role, name = parse_spiffe_id(uris[0], self.federation)
        record = self.store.get_site(reader_record_name(name) if role == "reader" else name)
        if record is None:
            raise Unauthenticated(f"{role} {name!r} is not enrolled")
        if record.cert_serial != serial_hex(cert):
            raise Unauthenticated(
                f"certificate {serial_hex(cert)} of {role} {name!r} was superseded by a later "
                "enrolment; use the newest certificate"
            )
        if record.revoked_at is not None:
            raise PermissionDenied(f"{role} {name!r} is revoked")
        return role, record

    def caller(self, context: grpc.ServicerContext) -> SiteRecord:
        """The enrolled, current, unrevoked site whose certificate made this call (readers
        are refused: they may call only GetEnsemble and DownloadArtifact)."""
        role, record = self.identity(context)
        if role != "site":
            raise PermissionDenied(
                f"reader {record.name.removeprefix('reader/')!r} may call only GetEnsemble and "
                "DownloadArtifact"
            )
        return record


def _abort(context: grpc.ServicerContext, method: str, error: AtollError) -> None:
    code = getattr(grpc.StatusCode, error.grpc_code_name, grpc.StatusCode.INTERNAL)
    log.warning("[Federation.%s] %s: %s", method, code.name, error)
    if error.retry_after is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, f"{error.retry_after:g}"),))
    context.abort(code, str(error))


DISK_FULL_RETRY = 60.0  # seconds a site waits before trying again when the disk is full


def _disk_full(error: Exception) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, sqlite3.OperationalError) and "full" in str(error)


def _handle(context: grpc.ServicerContext, method: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except AtollError as error:
        _abort(context, method, error)
        raise  # unreachable: abort raises
    except grpc.RpcError:
        # Reading the request failed: the peer (or the CallGuard's idle timeout) cancelled it.
        log.info("[Federation.%s] cancelled while reading the request", method)
        raise
    except Exception as error:
        if _disk_full(error):
            log.error("[Federation.%s] disk full: %s", method, error)
            full = ResourceExhausted("coordinator disk full: try again later", DISK_FULL_RETRY)
            _abort(context, method, full)
        # Logged with its traceback here; the peer learns only that it was not its fault.
        log.exception("[Federation.%s] internal error", method)
        context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error in {method} at the coordinator (logged there)",
        )
        raise  # unreachable: abort raises


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        def run() -> pb.EnrollResponse:
            result = enrolment.enroll(
                self.c.store, self.c.ca, request.token, request.site_name, request.csr_pem
            )
            log.info(
                "[Federation.Enroll] site %s enrolled as %s", request.site_name, result.spiffe_id
            )
            return serde.enrolment_to_pb(result)

        return _handle(context, "Enroll", run)

    def GetAssignment(
        self, request: pb.GetAssignmentRequest, context: grpc.ServicerContext
    ) -> pb.GetAssignmentResponse:
        def run() -> pb.GetAssignmentResponse:
            site = self.c.caller(context)
            reply = assignment.get_assignment(self.c.store, self.c.federation, site.name)
            return serde.assignment_to_pb(reply)

        return _handle(context, "GetAssignment", run)

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        def run() -> pb.HeartbeatResponse:
            site = self.c.caller(context)
            beat = serde.heartbeat_from_pb(request)
            reply = sites.heartbeat(self.c.store, site, beat, self.c.heartbeat_seconds)
            return serde.heartbeat_reply_to_pb(reply)

        return _handle(context, "Heartbeat", run)

    def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadArtifactResponse]:
        def prepare() -> tuple[pb.ArtifactRef, Iterator[tuple[int, bytes]]]:
            role, caller = self.c.identity(context)
            if role == "site" and is_image_name(request.name):
                image, data = open_image(
                    self.c.state, self.c.store, caller, request.name, request.offset
                )
                return pb.ArtifactRef(name=image.name, size=image.size, sha256=image.sha256), data
            if role == "reader":
                record = artifacts.authorize_reader_download(self.c.store, request.name)
            else:
                record = artifacts.authorize_site_download(self.c.store, caller, request.name)
            chunks = artifacts.read_chunks(self.c.state, record, request.offset)
            return pb.ArtifactRef(name=record.name, size=record.size, sha256=record.sha256), chunks

        ref, chunks = _handle(context, "DownloadArtifact", prepare)
        yield pb.DownloadArtifactResponse(artifact=ref, offset=request.offset)
        iterator = iter(chunks)
        while True:
            item = _handle(context, "DownloadArtifact", lambda: next(iterator, None))
            if item is None:
                return
            yield pb.DownloadArtifactResponse(offset=item[0], data=item[1])

    def BeginUpload(
        self, request: pb.BeginUploadRequest, context: grpc.ServicerContext
    ) -> pb.BeginUploadResponse:
        def run() -> pb.BeginUploadResponse:
            site = self.c.caller(context)
            files = serde.upload_files_from_pb(list(request.files))
            status = upload.begin(
                self.c.state, self.c.store, site, request.expert_index, files, quota=self.c.quota
            )
            log.info(
                "[Federation.BeginUpload] site %s expert %d upload %s (%d files)",
                site.name,
                request.expert_index,
                status.upload_id,
                len(files),
            )
            return serde.upload_status_to_pb(status)

        return _handle(context, "BeginUpload", run)

    def UploadChunk(
        self, request_iterator: Iterator[pb.UploadChunkRequest], context: grpc.ServicerContext
    ) -> pb.UploadChunkResponse:
        def run() -> pb.UploadChunkResponse:
            site = self.c.caller(context)
            chunks = (serde.chunk_from_pb(message) for message in request_iterator)
            received = self.c.writer.write(site, chunks)
            return pb.UploadChunkResponse(received=serde.received_to_pb(received))

        return _handle(context, "UploadChunk", run)

    def CommitUpload(
        self, request: pb.CommitUploadRequest, context: grpc.ServicerContext
    ) -> pb.CommitUploadResponse:
        def run() -> pb.CommitUploadResponse:
            site = self.c.caller(context)
            result = upload.commit(
                self.c.state,
                self.c.store,
                self.c.writer,
                site,
                request.upload_id,
                self.c.acceptance_checks,
                auditor=self.c.auditor,
            )
            verdict = "accepted" if result.accepted else f"not accepted: {result.reason}"
            log.info(
                "[Federation.CommitUpload] %s from %s %s", request.upload_id, site.name, verdict
            )
            return serde.commit_to_pb(result)

        return _handle(context, "CommitUpload", run)

    def GetEnsemble(
        self, request: pb.GetEnsembleRequest, context: grpc.ServicerContext
    ) -> pb.GetEnsembleResponse:
        def run() -> pb.GetEnsembleResponse:
            self.c.identity(context)  # sites and readers
            return serde.ensemble_to_pb(release.ensemble_info(self.c.store))

        return _handle(context, "GetEnsemble", run)

    def RenewCertificate(
        self, request: pb.RenewCertificateRequest, context: grpc.ServicerContext
    ) -> pb.RenewCertificateResponse:
        def run() -> pb.RenewCertificateResponse:
            role, caller = self.c.identity(context)
            renewed = certificates.renew(self.c.store, self.c.ca, caller, role, request.csr_pem)
            log.info("[Federation.RenewCertificate] %s %s renewed", role, caller.name)
            return pb.RenewCertificateResponse(
                certificate_pem=renewed.cert_pem.encode(),
                expires_at=certificates.expires_at(renewed.cert_pem),
            )

        return _handle(context, "RenewCertificate", run)


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
