"""The store's audit log: events at dense indexes 0..n-1, append-only, and the checkpoints
the coordinator signed over them (see :mod:`protocol.audit_log` for what that means)."""

from __future__ import annotations

import json
import sqlite3

from coordinator.store_records import AuditRecord
from coordinator.store_schema import Database
from protocol.audit_log import AuditEvent, Checkpoint, checkpoint_time
from protocol.errors import FailedPrecondition, InvalidArgument
from protocol.merkle import leaf_hash


def append_event(conn: sqlite3.Connection, event: AuditEvent) -> AuditRecord:
    """Appends at the next index, inside the caller's write transaction (BEGIN IMMEDIATE
    holds the database's write lock, so the count cannot change under us)."""
    canonical = event.canonical()
    index = conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0]
    record = AuditRecord(index, canonical, leaf_hash(canonical))
    conn.execute("INSERT INTO audit_events VALUES (?, ?, ?)", (index, canonical, record.leaf_hash))
    return record


class AuditTables(Database):
    def append_audit_event(self, event: AuditEvent) -> AuditRecord:
        """Appends ``event`` (for events that record no store change, e.g. ``published``)
        at the next index, assigned atomically: concurrent callers, in this process or
        another, get distinct, dense indexes."""
        with self._write() as conn:
            return append_event(conn, event)

    def audit_size(self) -> int:
        """The number of events in the log."""
        return int(self._read("SELECT COUNT(*) FROM audit_events")[0][0])

    def audit_events(self, start: int = 0, end: int | None = None) -> list[AuditRecord]:
        """The events with ``start <= index < end`` (default: to the end), in index order."""
        rows = self._read(
            "SELECT idx, canonical, leaf_hash FROM audit_events WHERE idx >= ? AND idx < ? "
            "ORDER BY idx",
            (start, end if end is not None else 1 << 62),
        )
        return [AuditRecord(r[0], bytes(r[1]), bytes(r[2])) for r in rows]

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Keeps a checkpoint the coordinator signed (append-only).

        A checkpoint covering more events than the log holds MUST raise InvalidArgument. One
        smaller than, or dated before, the latest kept checkpoint MUST raise
        FailedPrecondition (another writer signed a later head meanwhile: sign again), so
        kept checkpoints grow in size and time.
        """
        with self._write() as conn:
            row = conn.execute(
                "SELECT checkpoint_json FROM audit_checkpoints ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            latest = None if row is None else Checkpoint.from_json(json.loads(row[0]))
            size = conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0]
            _check_new_checkpoint(latest, checkpoint, size)
            conn.execute(
                "INSERT INTO audit_checkpoints (tree_size, checkpoint_json) VALUES (?, ?)",
                (checkpoint.tree_size, json.dumps(checkpoint.to_json(), sort_keys=True)),
            )

    def list_checkpoints(self) -> list[Checkpoint]:
        """Every kept checkpoint, oldest first."""
        rows = self._read("SELECT checkpoint_json FROM audit_checkpoints ORDER BY seq")
        return [Checkpoint.from_json(json.loads(r[0])) for r in rows]


def _check_new_checkpoint(latest: Checkpoint | None, new: Checkpoint, log_size: int) -> None:
    if new.tree_size > log_size:
        raise InvalidArgument(
            f"checkpoint of size {new.tree_size}: the audit log holds only {log_size} events"
        )
    if latest is None:
        return
    if new.tree_size < latest.tree_size:
        raise FailedPrecondition(
            f"checkpoint of size {new.tree_size}: a checkpoint of size {latest.tree_size} "
            "was signed meanwhile; sign the current head again"
        )
    if checkpoint_time(new) < checkpoint_time(latest):
        raise FailedPrecondition(
            f"checkpoint dated {new.timestamp}: the latest checkpoint is dated "
            f"{latest.timestamp}; sign the current head again"
        )
