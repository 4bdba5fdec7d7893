"""The coordinator's side of the audit log: which events it records, signed checkpoints,
acceptance receipts, the provenance table, and the log's verification.

The log itself (events, Merkle tree, checkpoints, receipts) is :mod:`protocol.audit_log`; the
store keeps its leaves and checkpoints (see :mod:`coordinator.store`). Every state change is
recorded *by the store, in the change's own transaction*: callers pass an event builder from
this module as the ``audit`` argument of the store method::

    store.revoke_site(name, time.time(), audit=audit.revoked_event)

Events that change no stored state (``assembled``, ``published``) go through
:func:`record_assembled` / :func:`record_published`. The coordinator signs checkpoints with its
P-256 signing key (``STATE/signing/signing.key``); the log id is its SPIFFE id.

Example (what `coordinator audit` does)::

    auditor = Auditor.open(state, store)
    report = verify_store_log(store, auditor.log_id, auditor.public_key)
    rows = provenance_table(store)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.state import StateDir
from coordinator.store import (
    AssignmentRecord,
    AuditRecord,
    PlanRecord,
    SiteRecord,
    Store,
    TokenRecord,
    UploadRecord,
)
from protocol.audit_log import (
    AuditEvent,
    AuditLog,
    Checkpoint,
    Receipt,
    export_lines,
    verify_checkpoint,
    verify_consistency_proof,
)
from protocol.canonical import canonical_digest, canonical_json
from protocol.errors import FailedPrecondition, InvalidArgument, VerificationFailed
from protocol.identity import coordinator_spiffe_id
from protocol.merkle import leaf_hash
from protocol.provenance import verify_provenance
from protocol.signing import PROVENANCE_FILE, SIGNATURE_FILE, read_signed_digests
from protocol.x509 import load_certificate, load_private_key

__all__ = [
    "AuditEvent",
    "Auditor",
    "LogReport",
    "ProvenanceRow",
    "accepted_event",
    "assigned_event",
    "enrolled_event",
    "export_log",
    "invited_event",
    "plan_set_event",
    "provenance_details",
    "provenance_table",
    "recipe_set_event",
    "record_assembled",
    "record_published",
    "rejected_event",
    "revoked_event",
    "upload_begun_event",
    "verify_store_log",
]

# Signing a checkpoint races with other writers (the server and CLI commands share the
# store); the store refuses a head older than the latest, and we sign again.
_CHECKPOINT_ATTEMPTS = 20


# -- events ------------------------------------------------------------------------------


def invited_event(token: TokenRecord) -> AuditEvent:
    """An enrolment token was issued (its secret is never logged, only its id)."""
    return AuditEvent.new(
        "invited",
        {
            "site": token.site,
            "role": token.role,
            "token_id": token.token_id,
            "expires_at": token.expires_at,
        },
    )


def recipe_set_event(description_json: str) -> AuditEvent:
    """The federation's recipe (and base checkpoint) was set or changed."""
    description = json.loads(description_json)
    return AuditEvent.new(
        "recipe_set",
        {
            "name": description.get("name"),
            "recipe_sha256": description.get("sha256"),
            "base_model_digest": (description.get("base_model") or {}).get("digest"),
        },
    )


def plan_set_event(plan: PlanRecord) -> AuditEvent:
    """The partition plan was set or replaced (before any expert was assigned)."""
    return AuditEvent.new("plan_set", {"plan_digest": plan.digest, "num_experts": plan.num_experts})


def enrolled_event(site: SiteRecord) -> AuditEvent:
    return AuditEvent.new(
        "enrolled",
        {"site": site.name, "spiffe_id": site.spiffe_id, "cert_serial": site.cert_serial},
    )


def assigned_event(record: AssignmentRecord, assignment_digest: str) -> AuditEvent:
    return AuditEvent.new(
        "assigned",
        {
            "site": record.site,
            "expert": record.expert_index,
            "plan_digest": record.plan_digest,
            "assignment_digest": assignment_digest,
        },
    )


def _files(record: UploadRecord) -> list[dict[str, Any]]:
    return [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in record.files]


def upload_begun_event(record: UploadRecord) -> AuditEvent:
    return AuditEvent.new(
        "upload_begun",
        {
            "upload_id": record.upload_id,
            "site": record.site,
            "expert": record.expert_index,
            "files": len(record.files),
            "bytes": sum(f.size for f in record.files),
            "manifest_sha256": canonical_digest(_files(record)),
        },
    )


def accepted_event(record: UploadRecord, provenance: Mapping[str, Any] | None) -> AuditEvent:
    """``provenance``: what :func:`provenance_details` read from the accepted directory."""
    return AuditEvent.new(
        "accepted",
        {
            "upload_id": record.upload_id,
            "site": record.site,
            "expert": record.expert_index,
            "files": _files(record),
            "provenance": dict(provenance) if provenance is not None else None,
        },
    )


def rejected_event(record: UploadRecord) -> AuditEvent:
    return AuditEvent.new(
        "rejected",
        {
            "upload_id": record.upload_id,
            "site": record.site,
            "expert": record.expert_index,
            "reason": record.reason,
        },
    )


def revoked_event(site: SiteRecord) -> AuditEvent:
    return AuditEvent.new(
        "revoked",
        {"site": site.name, "spiffe_id": site.spiffe_id, "cert_serial": site.cert_serial},
    )


def record_assembled(store: Store, details: Mapping[str, Any]) -> AuditRecord:
    """Records that an ensemble was assembled (details: experts and their digests...)."""
    return store.append_audit_event(AuditEvent.new("assembled", details))


def record_published(store: Store, details: Mapping[str, Any]) -> AuditRecord:
    """Records that an ensemble was published to readers."""
    return store.append_audit_event(AuditEvent.new("published", details))


def provenance_details(directory: Path, site: SiteRecord) -> dict[str, Any] | None:
    """The provenance of an uploaded expert, for its ``accepted`` event.

    Called after the acceptance checks verified the directory, so this only reads it back
    (one signature check, no hashing). None when the directory carries no provenance (a
    coordinator run without the provenance check).
    """
    try:
        envelope = (directory / PROVENANCE_FILE).read_bytes()
        digests = read_signed_digests((directory / SIGNATURE_FILE).read_bytes())
        key = load_certificate(site.cert_pem.encode(), "site certificate").public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return None
        provenance = verify_provenance(envelope, key)
    except (OSError, VerificationFailed, InvalidArgument):
        return None
    return {
        "model_root_digest": digests.root_sha256,
        "builder_id": provenance.builder_id,
        **provenance.run.to_json(),
    }


# -- checkpoints and receipts ------------------------------------------------------------


def load_log(store: Store, log_id: str) -> AuditLog:
    """The log rebuilt from the stored leaf hashes."""
    return AuditLog(log_id, leaf_hashes=[r.leaf_hash for r in store.audit_events()])


@dataclass(frozen=True)
class Auditor:
    """Signs checkpoints and receipts for one store with the coordinator's key."""

    store: Store
    log_id: str
    signing_key: ec.EllipticCurvePrivateKey

    @classmethod
    def open(cls, state: StateDir, store: Store) -> Auditor:
        return cls(
            store, coordinator_spiffe_id(state.federation()), load_private_key(state.signing_key)
        )

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.signing_key.public_key()

    def checkpoint(self) -> tuple[AuditLog, Checkpoint]:
        """Signs and keeps a checkpoint of the log as it is now; returns the log it covers."""
        for _ in range(_CHECKPOINT_ATTEMPTS):
            log = load_log(self.store, self.log_id)
            checkpoint = log.checkpoint(self.signing_key)
            try:
                self.store.add_checkpoint(checkpoint)
            except FailedPrecondition:
                continue  # another writer kept a later head meanwhile
            return log, checkpoint
        raise FailedPrecondition(
            f"could not sign an audit checkpoint in {_CHECKPOINT_ATTEMPTS} attempts: the log "
            "keeps moving (or the clock went backwards)"
        )

    def receipt(self, index: int) -> Receipt:
        """A receipt for event ``index`` under a fresh signed checkpoint."""
        log, checkpoint = self.checkpoint()
        records = self.store.audit_events(index, index + 1)
        if not records:
            raise InvalidArgument(f"audit event {index} does not exist (log size {log.size})")
        return log.receipt(records[0].event(), index, checkpoint)

    def upload_receipt(self, record: UploadRecord) -> str:
        """The receipt (canonical JSON) of an accepted upload: the kept one, else a new one
        for its ``accepted`` event, kept so that every later commit answers the same."""
        if record.receipt_json:
            return record.receipt_json
        index = _accepted_index(self.store, record.upload_id)
        receipt = canonical_json(self.receipt(index).to_json()).decode()
        return self.store.set_upload_receipt(record.upload_id, receipt).receipt_json


def _accepted_index(store: Store, upload_id: str) -> int:
    # The event was appended moments ago in the common case: search from the end.
    size = store.audit_size()
    step = 64
    end = size
    while end > 0:
        start = max(0, end - step)
        for record in reversed(store.audit_events(start, end)):
            event = record.event()
            if event.kind == "accepted" and event.details.get("upload_id") == upload_id:
                return record.index
        end = start
    raise FailedPrecondition(f"upload {upload_id} is accepted but the audit log has no record")


# -- verification, the provenance table, export ------------------------------------------


@dataclass(frozen=True)
class LogReport:
    """The outcome of :func:`verify_store_log` (``error`` empty when everything verified)."""

    log_id: str
    size: int
    root_hash: str
    checkpoints: int
    latest_checkpoint: dict[str, Any] | None
    unsigned_events: int  # events after the latest checkpoint
    error: str = ""

    @property
    def verified(self) -> bool:
        return not self.error

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "verified": self.verified}


def _read_log(store: Store) -> tuple[list[AuditRecord], list[Checkpoint]]:
    """The stored events and checkpoints; a store too damaged to read them (a changed column
    type, unparseable JSON, a broken database file) raises VerificationFailed naming why."""
    try:
        return store.audit_events(), store.list_checkpoints()
    except VerificationFailed:
        raise
    except Exception as error:  # whatever a damaged store throws: it is the finding
        raise VerificationFailed(
            f"the audit log could not be read from the store: {type(error).__name__}: {error}"
        ) from error


def verify_store_log(store: Store, log_id: str, public_key: ec.EllipticCurvePublicKey) -> LogReport:
    """Rebuilds the tree from the stored leaves and checks it: dense indexes, every leaf
    hash against its bytes, every checkpoint's signature and root, and an RFC 9162
    consistency proof between each pair of consecutive checkpoints. A store that cannot be
    read is a failed verification with the reason, never an exception."""
    log = AuditLog(log_id)
    error = ""
    records: list[AuditRecord] = []
    checkpoints: list[Checkpoint] = []
    try:
        records, checkpoints = _read_log(store)
        for position, record in enumerate(records):
            if record.index != position:
                raise VerificationFailed(
                    f"audit event at position {position} has index {record.index}: the log is "
                    "not dense"
                )
            if leaf_hash(record.canonical) != record.leaf_hash:
                raise VerificationFailed(
                    f"audit event {record.index}: its stored leaf hash does not match its bytes"
                )
            try:
                event = record.event()
            except (ValueError, InvalidArgument) as bad:
                raise VerificationFailed(f"audit event {record.index}: unreadable ({bad})") from bad
            appended = log.append(event)
            if appended.canonical != record.canonical:
                raise VerificationFailed(
                    f"audit event {record.index}: its bytes are not canonical JSON"
                )
        previous: Checkpoint | None = None
        for checkpoint in checkpoints:
            verify_checkpoint(checkpoint, public_key, log_id=log_id)
            log.check_checkpoint(checkpoint)
            if previous is not None:
                proof = log.consistency_proof(previous.tree_size, checkpoint.tree_size)
                verify_consistency_proof(previous, checkpoint, proof, public_key)
            previous = checkpoint
    except (VerificationFailed, InvalidArgument) as failure:
        error = str(failure)
    latest = checkpoints[-1] if checkpoints else None
    if latest is not None and latest.tree_size > len(records) and not error:
        error = (
            f"the latest checkpoint covers {latest.tree_size} events, the log holds {len(records)}"
        )
    return LogReport(
        log_id=log_id,
        size=len(records),
        root_hash=log.root().hex(),
        checkpoints=len(checkpoints),
        latest_checkpoint=latest.to_json() if latest else None,
        unsigned_events=len(records) - (latest.tree_size if latest else 0),
        error=error,
    )


@dataclass(frozen=True)
class ProvenanceRow:
    """One accepted expert, from its ``accepted`` event."""

    expert: int
    site: str
    base_model_digest: str
    data_digest: str  # the shard manifest's sha256
    recipe_digest: str
    model_root_digest: str
    accepted_at: str
    log_index: int
    upload_id: str
    site_revoked: bool

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def provenance_table(store: Store) -> list[ProvenanceRow]:
    """Every accepted expert in log order; experts of sites revoked since are flagged."""
    try:
        revoked = {s.name for s in store.list_sites() if s.revoked_at is not None}
        records = store.audit_events()
    except Exception:  # a damaged store: verify_store_log reports it
        return []
    rows = []
    for record in records:
        try:
            rows += _provenance_row(record, revoked)
        except (ValueError, TypeError, KeyError, AttributeError, InvalidArgument):
            continue  # a damaged entry: verify_store_log reports it
    return rows


def _provenance_row(record: AuditRecord, revoked: set[str]) -> list[ProvenanceRow]:
    event = record.event()
    if event.kind != "accepted":
        return []
    details = event.details
    provenance = details.get("provenance") or {}
    return [
        ProvenanceRow(
            expert=int(details["expert"]),
            site=str(details["site"]),
            base_model_digest=str(provenance.get("base_model_digest", "")),
            data_digest=str(provenance.get("shard_manifest_digest", "")),
            recipe_digest=str(provenance.get("recipe_digest", "")),
            model_root_digest=str(provenance.get("model_root_digest", "")),
            accepted_at=event.at,
            log_index=record.index,
            upload_id=str(details["upload_id"]),
            site_revoked=details["site"] in revoked,
        )
    ]


def export_log(store: Store, path: Path) -> int:
    """Writes the JSON-lines export (:func:`protocol.audit_log.export_lines`) atomically;
    returns the number of events written."""
    records = store.audit_events()
    checkpoints = [c for c in store.list_checkpoints() if c.tree_size <= len(records)]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        for line in export_lines((r.event() for r in records), checkpoints):
            handle.write(line)
    os.replace(tmp, path)
    return len(records)
