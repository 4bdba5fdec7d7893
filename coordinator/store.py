"""The coordinator's durable state: one SQLite file (WAL) behind one class, :class:`Store`.

Its methods' docstrings are the contract, and ``tests/test_store.py`` holds it to them. The
methods live with their tables: :mod:`coordinator.store_sites` (tokens, sites, heartbeats),
:mod:`coordinator.store_plan` (settings, plan, assignments), :mod:`coordinator.store_artifacts`
(served files, the published ensemble), :mod:`coordinator.store_uploads`,
:mod:`coordinator.store_audit`; :mod:`coordinator.store_schema` holds the tables, their
migrations and the connection, :mod:`coordinator.store_records` the records they return.
``coordinator.state.open_store`` opens one from a URL.

Times are POSIX seconds (float). Methods raise ``protocol.errors`` exceptions; a method that
raises changes nothing.

**Audit log.** The store keeps the federation's append-only audit log (see
:mod:`protocol.audit_log` for what that means): events at dense indexes 0..n-1, each as its
canonical bytes and RFC 9162 leaf hash, never rewritten, and every checkpoint the coordinator
signed. The index is assigned by the store, atomically, so a CLI process and the server can
append to the same store. A method that changes state takes an optional ``audit`` function
(:data:`EventFor`): when (and only when) the call changes state, the store calls it with the
new record and appends its event *in the same transaction*, so no state change is ever
missing from the log and no event describes a change that did not happen.
"""

from __future__ import annotations

from coordinator.store_artifacts import ArtifactTables
from coordinator.store_audit import AuditTables
from coordinator.store_plan import PlanTables
from coordinator.store_records import (
    HEARTBEAT_HISTORY,
    ArtifactRecord,
    AssignmentRecord,
    AuditRecord,
    EnsembleRecord,
    EventFor,
    HeartbeatRecord,
    PlanRecord,
    SiteRecord,
    TokenRecord,
    UploadRecord,
)
from coordinator.store_schema import SCHEMA_VERSION
from coordinator.store_sites import SiteTables
from coordinator.store_uploads import UploadTables

__all__ = [
    "HEARTBEAT_HISTORY",
    "SCHEMA_VERSION",
    "ArtifactRecord",
    "AssignmentRecord",
    "AuditRecord",
    "EnsembleRecord",
    "EventFor",
    "HeartbeatRecord",
    "PlanRecord",
    "SiteRecord",
    "Store",
    "TokenRecord",
    "UploadRecord",
]


class Store(PlanTables, SiteTables, ArtifactTables, UploadTables, AuditTables):
    """Durable federation state, safe for concurrent callers in this process and others.

    ``Store(path)`` opens (creating or migrating) the SQLite file at ``path``;
    ``Store(":memory:")`` holds a store in memory for as long as the object lives.
    """
