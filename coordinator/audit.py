"""The coordinator's side of the audit log: which events it records, and the checkpoints and
acceptance receipts it signs (reading the log back: :mod:`coordinator.audit_report`).

The log itself (events, Merkle tree, checkpoints, receipts) is :mod:`protocol.audit_log`; the
store keeps its leaves and checkpoints (see :mod:`coordinator.store`). Every state change is
recorded *by the store, in the change's own transaction*: callers pass an event builder from
this module as the ``audit`` argument of the store method::

    store.revoke_site(name, time.time(), audit=audit.revoked_event)

Events that change no stored state (``assembled``, ``published``) go through
:func:`record_assembled` / :func:`record_published`. The coordinator signs checkpoints with its
P-256 signing key (``STATE/signing/signing.key``); the log id is its SPIFFE id.

Example (what `coordinator revoke` does)::

    store.revoke_site(name, time.time(), audit=revoked_event)
    Auditor.open(state, store).checkpoint()
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
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
)
from protocol.canonical import canonical_digest, canonical_json
from protocol.errors import FailedPrecondition, InvalidArgument, VerificationFailed
from protocol.identity import coordinator_spiffe_id
from protocol.provenance import verify_provenance
from protocol.signing import PROVENANCE_FILE, SIGNATURE_FILE, read_signed_digests
from protocol.x509 import load_certificate, load_private_key

__all__ = [
    "AuditEvent",
    "Auditor",
    "accepted_event",
    "assigned_event",
    "enrolled_event",
    "invited_event",
    "plan_set_event",
    "provenance_details",
    "recipe_set_event",
    "record_assembled",
    "record_published",
    "rejected_event",
    "revoked_event",
    "site_details",
    "upload_begun_event",
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


def site_details(site: SiteRecord) -> dict[str, Any]:
    """What names a site and its current certificate in an event."""
    return {"site": site.name, "spiffe_id": site.spiffe_id, "cert_serial": site.cert_serial}


def enrolled_event(site: SiteRecord) -> AuditEvent:
    return AuditEvent.new("enrolled", site_details(site))


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


def _upload_details(record: UploadRecord) -> dict[str, Any]:
    return {"upload_id": record.upload_id, "site": record.site, "expert": record.expert_index}


def upload_begun_event(record: UploadRecord) -> AuditEvent:
    return AuditEvent.new(
        "upload_begun",
        {
            **_upload_details(record),
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
            **_upload_details(record),
            "files": _files(record),
            "provenance": dict(provenance) if provenance is not None else None,
        },
    )


def rejected_event(record: UploadRecord) -> AuditEvent:
    return AuditEvent.new("rejected", {**_upload_details(record), "reason": record.reason})


def revoked_event(site: SiteRecord) -> AuditEvent:
    return AuditEvent.new("revoked", site_details(site))


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
