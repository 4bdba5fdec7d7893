"""The store's SQLite file: its tables, their migrations, and the one connection every
table group reads and writes through (WAL; each write one ``BEGIN IMMEDIATE`` transaction)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from protocol.errors import FailedPrecondition

R = TypeVar("R")

# 2: the audit log (events, checkpoints) and upload receipts.
# 3: a bounded history of each site's heartbeats (the dashboard's loss curves).
SCHEMA_VERSION = 3

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


class Database:
    """One connection, serialised by a lock; WAL lets other processes read concurrently.

    ``path`` is a file, or ``:memory:`` for a store that lives as long as the object (tests).
    """

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
        # Before creating any table: a newer Atoll's store is refused, not altered.
        self._refuse_newer(self._stored_version())
        with self._lock:
            self._conn.executescript(_SCHEMA)  # IF NOT EXISTS: safe on every open
        with self._write() as conn:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] < SCHEMA_VERSION:
                _migrate(conn, row[0])
            else:
                self._refuse_newer(row[0])

    def _stored_version(self) -> int | None:
        with self._lock:
            exists = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            row = (
                self._conn.execute("SELECT version FROM schema_version").fetchone()
                if exists
                else None
            )
        return None if row is None else int(row[0])

    def _refuse_newer(self, version: int | None) -> None:
        if version is not None and version > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"{self._path}: store schema version {version}, this Atoll reads "
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

    def _one(self, record: Callable[..., R], sql: str, args: tuple[Any, ...] = ()) -> R | None:
        """The first row as a ``record`` (the row's columns are its fields), or None."""
        rows = self._read(sql, args)
        return record(**dict(rows[0])) if rows else None

    def _all(self, record: Callable[..., R], sql: str, args: tuple[Any, ...] = ()) -> list[R]:
        """Every row as a ``record``."""
        return [record(**dict(row)) for row in self._read(sql, args)]

    def schema_version(self) -> int:
        """The schema version this store holds (``SCHEMA_VERSION`` for a current store)."""
        return int(self._read("SELECT version FROM schema_version")[0][0])

    def close(self) -> None:
        """Releases the connection."""
        with self._lock:
            self._conn.close()
