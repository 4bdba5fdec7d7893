"""Reading the coordinator's audit log back: its verification, the provenance table of
accepted experts, and the JSON-lines export (:func:`protocol.audit_export.export_lines`).

Example (what `coordinator audit` does)::

    auditor = Auditor.open(state, store)
    report = verify_store_log(store, auditor.log_id, auditor.public_key)
    rows = provenance_table(store)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.store import AuditRecord, Store
from protocol.audit_export import export_lines
from protocol.audit_log import AuditLog, Checkpoint, verify_checkpoint, verify_consistency_proof
from protocol.errors import InvalidArgument, VerificationFailed
from protocol.merkle import leaf_hash


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
    """Writes the JSON-lines export (:func:`protocol.audit_export.export_lines`) atomically;
    returns the number of events written."""
    records = store.audit_events()
    checkpoints = [c for c in store.list_checkpoints() if c.tree_size <= len(records)]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        for line in export_lines((r.event() for r in records), checkpoints):
            handle.write(line)
    os.replace(tmp, path)
    return len(records)
