"""The Federation servicer: each RPC a few lines over a plain function of the coordinator
package, run through :func:`_handle`, which maps errors to gRPC statuses.

The caller is whoever its certificate names (its SPIFFE URI SAN, checked against the
federation CA and the store: :meth:`Coordinator.identity`), never a request field.

Errors: a domain error (:mod:`protocol.errors`) is answered with its status and message; a full
disk with RESOURCE_EXHAUSTED "coordinator disk full" and a retry hint; anything else with
INTERNAL and no detail (the traceback is logged here, never sent: it names server paths).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar, cast

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
from coordinator.call_limits import RETRY_AFTER_KEY
from coordinator.federation import load_authority
from coordinator.images import is_image_name, open_image
from coordinator.state import StateDir
from coordinator.store import SiteRecord, Store
from coordinator.upload_writer import UploadWriter
from protocol import federation_pb2 as pb
from protocol import federation_pb2_grpc as pb_grpc
from protocol import serde
from protocol.errors import AtollError, PermissionDenied, ResourceExhausted, Unauthenticated
from protocol.identity import parse_spiffe_id, reader_record_name
from protocol.x509 import load_certificate, serial_hex, signed_by, uri_sans

log = logging.getLogger("atoll.coordinator")
T = TypeVar("T")


@dataclass
class Coordinator:
    """Everything a request handler needs, built once per server."""

    state: StateDir
    store: Store
    ca: CertificateAuthority
    writer: UploadWriter
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
        writer = UploadWriter(state, store)
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
