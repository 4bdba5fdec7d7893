"""The SQLite store (WAL): the coordinator's durable state in one file."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coordinator.store import (
    HEARTBEAT_HISTORY,
    SCHEMA_VERSION,
    ArtifactRecord,
    AssignmentRecord,
    AuditRecord,
    EnsembleRecord,
    EventFor,
    HeartbeatRecord,
    PlanRecord,
    SiteRecord,
    Store,
    TokenRecord,
    UploadRecord,
    check_finish_upload,
    check_new_checkpoint,
)
from protocol.audit_log import AuditEvent, Checkpoint
from protocol.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from protocol.merkle import leaf_hash
from protocol.messages import UploadFile

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
  token_id TEXT PRIMARY KEY, site TEXT NOT NULL, secret_sha256 TEXT NOT NULL,
  role TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, used_at REAL);
CREATE TABLE IF NOT EXISTS sites (
  name TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, cert_serial TEXT NOT NULL,
  cert_pem TEXT NOT NULL, enrolled_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE IF NOT EXISTS heartbeats (
  site TEXT PRIMARY KEY REFERENCES sites(name), at REAL NOT NULL, phase TEXT NOT NULL,
  step INTEGER NOT NULL, total_steps INTEGER NOT NULL, loss REAL NOT NULL,
  tokens_per_second REAL NOT NULL, eta_seconds REAL NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS plan (
  id INTEGER PRIMARY KEY CHECK (id = 1), digest TEXT NOT NULL, num_experts INTEGER NOT NULL,
  created_at REAL NOT NULL, summary_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
  expert_index INTEGER PRIMARY KEY, site TEXT NOT NULL UNIQUE REFERENCES sites(name),
  plan_digest TEXT NOT NULL, assigned_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
  name TEXT PRIMARY KEY, path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
  expert INTEGER, audience TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (
  upload_id TEXT PRIMARY KEY, site TEXT NOT NULL, expert_index INTEGER NOT NULL,
  manifest_key TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL,
  created_at REAL NOT NULL, updated_at REAL NOT NULL, receipt_json TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS uploads_by_manifest ON uploads (site, expert_index, manifest_key);
CREATE TABLE IF NOT EXISTS upload_files (
  upload_id TEXT NOT NULL REFERENCES uploads(upload_id), path TEXT NOT NULL,
  size INTEGER NOT NULL, sha256 TEXT NOT NULL, received INTEGER NOT NULL,
  position INTEGER NOT NULL, PRIMARY KEY (upload_id, path));
CREATE TABLE IF NOT EXISTS ensemble (
  id INTEGER PRIMARY KEY CHECK (id = 1), manifest_json TEXT NOT NULL,
  artifact_names TEXT NOT NULL, published_at REAL NOT NULL);
"""
    + """
CREATE TABLE IF NOT EXISTS audit_events (
  idx INTEGER PRIMARY KEY, canonical BLOB NOT NULL, leaf_hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, tree_size INTEGER NOT NULL,
  checkpoint_json TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
  BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
  BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
  BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
  BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
"""
    + """
CREATE TABLE IF NOT EXISTS heartbeat_history (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL REFERENCES sites(name),
  at REAL NOT NULL, phase TEXT NOT NULL, step INTEGER NOT NULL, total_steps INTEGER NOT NULL,
  loss REAL NOT NULL, tokens_per_second REAL NOT NULL, eta_seconds REAL NOT NULL,
  message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS heartbeat_history_by_site ON heartbeat_history (site, seq);
"""
)


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """Brings an older store up to ``SCHEMA_VERSION`` (inside the caller's transaction).

    The new tables already exist (``_SCHEMA`` creates what is missing); what remains is
    changing existing tables.
    """
    if version < 2:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(uploads)")}
        if "receipt_json" not in columns:
            conn.execute("ALTER TABLE uploads ADD COLUMN receipt_json TEXT NOT NULL DEFAULT ''")
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))


def _append(conn: sqlite3.Connection, event: AuditEvent) -> AuditRecord:
    """Appends at the next index, inside the caller's write transaction (BEGIN IMMEDIATE
    holds the database's write lock, so the count cannot change under us)."""
    canonical = event.canonical()
    index = conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0]
    record = AuditRecord(index, canonical, leaf_hash(canonical))
    conn.execute("INSERT INTO audit_events VALUES (?, ?, ?)", (index, canonical, record.leaf_hash))
    return record


def manifest_key(files: tuple[UploadFile, ...]) -> str:
    """Identifies an upload's file list, so a resumed BeginUpload finds its session."""
    return json.dumps([[f.path, f.size, f.sha256] for f in files])


class SqliteStore(Store):
    """One connection, serialised by a lock; WAL lets other processes read concurrently."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self._path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns. NORMAL (WAL's usual) may lose the last
        # commits at a power loss, and with them audit events whose receipts sites hold.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._check_not_newer()
        with self._lock:
            self._conn.executescript(_SCHEMA)  # IF NOT EXISTS: safe on every open
        with self._write() as conn:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] < SCHEMA_VERSION:
                _migrate(conn, row[0])
            elif row[0] > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"{self._path}: store schema version {row[0]}, this Atoll reads "
                    f"{SCHEMA_VERSION}: upgrade Atoll"
                )

    def _check_not_newer(self) -> None:
        # Before creating any table: a newer Atoll's store is refused, not altered.
        with self._lock:
            exists = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            row = (
                self._conn.execute("SELECT version FROM schema_version").fetchone()
                if exists
                else None
            )
        if row is not None and row[0] > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"{self._path}: store schema version {row[0]}, this Atoll reads "
                f"{SCHEMA_VERSION}: upgrade Atoll"
            )

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so check-then-write is atomic even
        # against another process (e.g. a CLI command beside a running server).
        with self._lock:
            if not durable:
                # Not fsynced at commit (the next durable commit carries it to disk): for
                # heartbeats, which a power loss may lose and the next beat replaces.
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- federation ----------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self._read("SELECT version FROM schema_version")[0][0])

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str, audit: EventFor[str] | None = None) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            if audit is not None and (row is None or row[0] != value):
                _append(conn, audit(value))

    # -- tokens and sites ----------------------------------------------------------------
    def add_token(self, token: TokenRecord, audit: EventFor[TokenRecord] | None = None) -> None:
        with self._write() as conn:
            if conn.execute(
                "SELECT 1 FROM tokens WHERE token_id = ?", (token.token_id,)
            ).fetchone():
                raise AlreadyExists(f"token id {token.token_id} already exists")
            conn.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    token.token_id,
                    token.site,
                    token.secret_sha256,
                    token.role,
                    token.created_at,
                    token.expires_at,
                    token.used_at,
                ),
            )
            if audit is not None:
                _append(conn, audit(token))

    def get_token(self, token_id: str) -> TokenRecord | None:
        rows = self._read("SELECT * FROM tokens WHERE token_id = ?", (token_id,))
        return TokenRecord(**dict(rows[0])) if rows else None

    def enroll_site(
        self,
        token_id: str,
        site: SiteRecord,
        now: float,
        audit: EventFor[SiteRecord] | None = None,
    ) -> SiteRecord:
        with self._write() as conn:
            row = conn.execute("SELECT used_at FROM tokens WHERE token_id = ?", (token_id,))
            found = row.fetchone()
            if found is None:
                raise Unauthenticated(f"unknown enrolment token {token_id}")
            if found[0] is not None:
                raise Unauthenticated(f"enrolment token {token_id} was already used")
            conn.execute("UPDATE tokens SET used_at = ? WHERE token_id = ?", (now, token_id))
            conn.execute(
                "INSERT INTO sites VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(name) DO UPDATE SET "
                "spiffe_id = excluded.spiffe_id, cert_serial = excluded.cert_serial, "
                "cert_pem = excluded.cert_pem, enrolled_at = excluded.enrolled_at",
                (site.name, site.spiffe_id, site.cert_serial, site.cert_pem, site.enrolled_at),
            )
            row = conn.execute("SELECT * FROM sites WHERE name = ?", (site.name,)).fetchone()
            stored = SiteRecord(**dict(row))
            if audit is not None:
                _append(conn, audit(stored))
        return stored

    def get_site(self, name: str) -> SiteRecord | None:
        rows = self._read("SELECT * FROM sites WHERE name = ?", (name,))
        return SiteRecord(**dict(rows[0])) if rows else None

    def list_sites(self) -> list[SiteRecord]:
        return [SiteRecord(**dict(r)) for r in self._read("SELECT * FROM sites ORDER BY name")]

    def renew_certificate(
        self,
        name: str,
        old_serial: str,
        site: SiteRecord,
        audit: EventFor[SiteRecord] | None = None,
    ) -> SiteRecord:
        with self._write() as conn:
            row = conn.execute("SELECT * FROM sites WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no enrolled site named {name!r}")
            if row["revoked_at"] is not None:
                raise PermissionDenied(f"{name!r} is revoked; its certificate cannot be renewed")
            if row["cert_serial"] != old_serial:
                raise FailedPrecondition(
                    f"{name!r}: certificate {old_serial} is no longer current (now "
                    f"{row['cert_serial']}); renew with the newest certificate"
                )
            conn.execute(
                "UPDATE sites SET cert_serial = ?, cert_pem = ? WHERE name = ?",
                (site.cert_serial, site.cert_pem, name),
            )
            row = conn.execute("SELECT * FROM sites WHERE name = ?", (name,)).fetchone()
            renewed = SiteRecord(**dict(row))
            if audit is not None:
                _append(conn, audit(renewed))
        return renewed

    def revoke_site(
        self, name: str, now: float, audit: EventFor[SiteRecord] | None = None
    ) -> SiteRecord:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM sites WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no enrolled site named {name!r}")
            changed = conn.execute(
                "UPDATE sites SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now, name),
            ).rowcount
            row = conn.execute("SELECT * FROM sites WHERE name = ?", (name,)).fetchone()
            site = SiteRecord(**dict(row))
            if changed and audit is not None:
                _append(conn, audit(site))
        return site

    # -- heartbeats ----------------------------------------------------------------------
    def record_heartbeat(self, heartbeat: HeartbeatRecord) -> None:
        with self._write(durable=False) as conn:
            if (
                conn.execute("SELECT 1 FROM sites WHERE name = ?", (heartbeat.site,)).fetchone()
                is None
            ):
                raise NotFound(f"no enrolled site named {heartbeat.site!r}")
            row = dataclasses.astuple(heartbeat)  # the tables' column order
            conn.execute(
                "INSERT OR REPLACE INTO heartbeats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row
            )
            conn.execute(
                "INSERT INTO heartbeat_history (site, at, phase, step, total_steps, loss, "
                "tokens_per_second, eta_seconds, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            # Bounded: drop what falls out of the newest HEARTBEAT_HISTORY of this site.
            conn.execute(
                "DELETE FROM heartbeat_history WHERE site = ? AND seq <= (SELECT seq FROM "
                "heartbeat_history WHERE site = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (heartbeat.site, heartbeat.site, HEARTBEAT_HISTORY),
            )

    def heartbeat_history(self, site: str, limit: int = HEARTBEAT_HISTORY) -> list[HeartbeatRecord]:
        rows = self._read(
            "SELECT site, at, phase, step, total_steps, loss, tokens_per_second, eta_seconds, "
            "message FROM heartbeat_history WHERE site = ? ORDER BY seq DESC LIMIT ?",
            (site, limit),
        )
        return [HeartbeatRecord(**dict(r)) for r in reversed(rows)]

    def latest_heartbeats(self) -> dict[str, HeartbeatRecord]:
        rows = self._read("SELECT * FROM heartbeats")
        return {r["site"]: HeartbeatRecord(**dict(r)) for r in rows}

    # -- plan and assignments ------------------------------------------------------------
    def put_plan(self, plan: PlanRecord, audit: EventFor[PlanRecord] | None = None) -> None:
        with self._write() as conn:
            current = conn.execute("SELECT digest FROM plan WHERE id = 1").fetchone()
            if current is not None and current[0] == plan.digest:
                return
            assigned = conn.execute("SELECT COUNT(*) FROM assignments").fetchone()[0]
            if assigned:
                raise FailedPrecondition(
                    f"{assigned} expert(s) are already assigned under plan "
                    f"{current[0][:12] if current else '?'}; the partition plan cannot change now"
                )
            conn.execute(
                "INSERT OR REPLACE INTO plan VALUES (1, ?, ?, ?, ?)",
                (plan.digest, plan.num_experts, plan.created_at, plan.summary_json),
            )
            if audit is not None:
                _append(conn, audit(plan))

    def get_plan(self) -> PlanRecord | None:
        rows = self._read("SELECT digest, num_experts, created_at, summary_json FROM plan")
        return PlanRecord(**dict(rows[0])) if rows else None

    def assign_expert(
        self, site: str, now: float, audit: EventFor[AssignmentRecord] | None = None
    ) -> AssignmentRecord | None:
        with self._write() as conn:
            plan = conn.execute("SELECT digest, num_experts FROM plan WHERE id = 1").fetchone()
            if plan is None:
                raise FailedPrecondition("no partition plan yet: run `coordinator partition`")
            if conn.execute("SELECT 1 FROM sites WHERE name = ?", (site,)).fetchone() is None:
                raise NotFound(f"no enrolled site named {site!r}")
            row = conn.execute("SELECT * FROM assignments WHERE site = ?", (site,)).fetchone()
            if row is not None:
                return AssignmentRecord(**dict(row))
            taken = {r[0] for r in conn.execute("SELECT expert_index FROM assignments")}
            free = [k for k in range(plan["num_experts"]) if k not in taken]
            if not free:
                return None
            record = AssignmentRecord(free[0], site, plan["digest"], now)
            conn.execute(
                "INSERT INTO assignments VALUES (?, ?, ?, ?)",
                (record.expert_index, record.site, record.plan_digest, record.assigned_at),
            )
            if audit is not None:
                _append(conn, audit(record))
        return record

    def get_assignment(self, site: str) -> AssignmentRecord | None:
        rows = self._read("SELECT * FROM assignments WHERE site = ?", (site,))
        return AssignmentRecord(**dict(rows[0])) if rows else None

    def list_assignments(self) -> list[AssignmentRecord]:
        rows = self._read("SELECT * FROM assignments ORDER BY expert_index")
        return [AssignmentRecord(**dict(r)) for r in rows]

    # -- artifacts -----------------------------------------------------------------------
    def put_artifact(self, artifact: ArtifactRecord) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?)",
                (
                    artifact.name,
                    artifact.path,
                    artifact.size,
                    artifact.sha256,
                    artifact.expert,
                    artifact.audience,
                ),
            )

    def get_artifact(self, name: str) -> ArtifactRecord | None:
        rows = self._read("SELECT * FROM artifacts WHERE name = ?", (name,))
        return ArtifactRecord(**dict(rows[0])) if rows else None

    def list_artifacts(self) -> list[ArtifactRecord]:
        return [
            ArtifactRecord(**dict(r)) for r in self._read("SELECT * FROM artifacts ORDER BY name")
        ]

    def remove_artifacts(self, prefix: str) -> int:
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM artifacts WHERE substr(name, 1, ?) = ?", (len(prefix), prefix)
            )
        return cursor.rowcount

    # -- uploads -------------------------------------------------------------------------
    def _upload(self, conn: sqlite3.Connection, upload_id: str) -> UploadRecord | None:
        row = conn.execute("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
        if row is None:
            return None
        files = conn.execute(
            "SELECT path, size, sha256, received FROM upload_files WHERE upload_id = ? "
            "ORDER BY position",
            (upload_id,),
        ).fetchall()
        return UploadRecord(
            upload_id=row["upload_id"],
            site=row["site"],
            expert_index=row["expert_index"],
            files=tuple(UploadFile(f["path"], f["size"], f["sha256"]) for f in files),
            received={f["path"]: f["received"] for f in files},
            state=row["state"],
            reason=row["reason"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            receipt_json=row["receipt_json"],
        )

    def begin_upload(
        self, upload: UploadRecord, audit: EventFor[UploadRecord] | None = None
    ) -> UploadRecord:
        key = manifest_key(upload.files)
        with self._write() as conn:
            row = conn.execute(
                "SELECT upload_id FROM uploads WHERE site = ? AND expert_index = ? AND "
                "manifest_key = ? AND state IN ('open', 'accepted') ORDER BY state = 'open'",
                (upload.site, upload.expert_index, key),
            ).fetchone()
            if row is not None:
                existing = self._upload(conn, row[0])
                assert existing is not None
                return existing
            conn.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, 'open', '', ?, ?, '')",
                (
                    upload.upload_id,
                    upload.site,
                    upload.expert_index,
                    key,
                    upload.created_at,
                    upload.created_at,
                ),
            )
            conn.executemany(
                "INSERT INTO upload_files VALUES (?, ?, ?, ?, 0, ?)",
                [
                    (upload.upload_id, f.path, f.size, f.sha256, i)
                    for i, f in enumerate(upload.files)
                ],
            )
            created = self._upload(conn, upload.upload_id)
            assert created is not None
            if audit is not None:
                _append(conn, audit(created))
        return created

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        with self._lock:
            return self._upload(self._conn, upload_id)

    def list_uploads(self, state: str | None = None) -> list[UploadRecord]:
        with self._lock:
            ids = self._conn.execute(
                "SELECT upload_id FROM uploads WHERE ? IS NULL OR state = ? "
                "ORDER BY created_at, upload_id",
                (state, state),
            ).fetchall()
            found = [self._upload(self._conn, row[0]) for row in ids]
        return [u for u in found if u is not None]

    def advance_upload(self, upload_id: str, path: str, offset: int, length: int) -> int:
        with self._write() as conn:
            state = conn.execute(
                "SELECT state FROM uploads WHERE upload_id = ?", (upload_id,)
            ).fetchone()
            if state is None:
                raise NotFound(f"unknown upload id {upload_id!r}")
            if state[0] != "open":
                raise FailedPrecondition(f"upload {upload_id} is already {state[0]}")
            row = conn.execute(
                "SELECT size, received FROM upload_files WHERE upload_id = ? AND path = ?",
                (upload_id, path),
            ).fetchone()
            if row is None:
                raise NotFound(f"upload {upload_id}: {path!r} is not in its file list")
            size, received = row
            if offset != received:
                raise InvalidArgument(
                    f"upload {upload_id}: chunk of {path!r} at offset {offset}, "
                    f"expected offset {received}"
                )
            if offset + length > size:
                raise InvalidArgument(
                    f"upload {upload_id}: chunk would grow {path!r} to {offset + length} bytes, "
                    f"past its declared size {size}"
                )
            conn.execute(
                "UPDATE upload_files SET received = ? WHERE upload_id = ? AND path = ?",
                (offset + length, upload_id, path),
            )
        return offset + length

    def finish_upload(
        self,
        upload_id: str,
        state: str,
        reason: str,
        now: float,
        audit: EventFor[UploadRecord] | None = None,
    ) -> UploadRecord:
        with self._write() as conn:
            check_finish_upload(upload_id, self._upload(conn, upload_id), state)
            conn.execute(
                "UPDATE uploads SET state = ?, reason = ?, updated_at = ? WHERE upload_id = ?",
                (state, reason, now, upload_id),
            )
            finished = self._upload(conn, upload_id)
            assert finished is not None
            if audit is not None:
                _append(conn, audit(finished))
        return finished

    def set_upload_receipt(self, upload_id: str, receipt_json: str) -> UploadRecord:
        with self._write() as conn:
            current = self._upload(conn, upload_id)
            if current is None:
                raise NotFound(f"unknown upload id {upload_id!r}")
            if current.state != "accepted":
                raise FailedPrecondition(
                    f"upload {upload_id} is {current.state}: only an accepted upload has a receipt"
                )
            if current.receipt_json:
                return current
            conn.execute(
                "UPDATE uploads SET receipt_json = ? WHERE upload_id = ?",
                (receipt_json, upload_id),
            )
            updated = self._upload(conn, upload_id)
        assert updated is not None
        return updated

    # -- audit log -----------------------------------------------------------------------
    def append_audit_event(self, event: AuditEvent) -> AuditRecord:
        with self._write() as conn:
            return _append(conn, event)

    def audit_size(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM audit_events")[0][0])

    def audit_events(self, start: int = 0, end: int | None = None) -> list[AuditRecord]:
        rows = self._read(
            "SELECT idx, canonical, leaf_hash FROM audit_events WHERE idx >= ? AND idx < ? "
            "ORDER BY idx",
            (start, end if end is not None else 1 << 62),
        )
        return [AuditRecord(r[0], bytes(r[1]), bytes(r[2])) for r in rows]

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT checkpoint_json FROM audit_checkpoints ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            latest = None if row is None else Checkpoint.from_json(json.loads(row[0]))
            size = conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0]
            check_new_checkpoint(latest, checkpoint, size)
            conn.execute(
                "INSERT INTO audit_checkpoints (tree_size, checkpoint_json) VALUES (?, ?)",
                (checkpoint.tree_size, json.dumps(checkpoint.to_json(), sort_keys=True)),
            )

    def list_checkpoints(self) -> list[Checkpoint]:
        rows = self._read("SELECT checkpoint_json FROM audit_checkpoints ORDER BY seq")
        return [Checkpoint.from_json(json.loads(r[0])) for r in rows]

    # -- ensemble ------------------------------------------------------------------------
    def publish_ensemble(self, ensemble: EnsembleRecord) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO ensemble VALUES (1, ?, ?, ?)",
                (
                    ensemble.manifest_json,
                    json.dumps(list(ensemble.artifact_names)),
                    ensemble.published_at,
                ),
            )

    def get_ensemble(self) -> EnsembleRecord | None:
        rows = self._read("SELECT * FROM ensemble WHERE id = 1")
        if not rows:
            return None
        return EnsembleRecord(
            manifest_json=rows[0]["manifest_json"],
            artifact_names=tuple(json.loads(rows[0]["artifact_names"])),
            published_at=rows[0]["published_at"],
        )
