"""The coordinator's durable state behind one interface.

Every backend implements :class:`Store`; its docstrings are the contract, and
``tests/test_store.py`` runs one test class against every backend. ``open_store`` picks the
backend from a URL: ``sqlite:///path/to/store.db`` (the real one, WAL mode) or ``memory://``.

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

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from protocol.audit_log import AuditEvent, Checkpoint
from protocol.errors import FailedPrecondition, InvalidArgument, NotFound
from protocol.messages import UploadFile

# 2: the audit log (events, checkpoints) and upload receipts.
# 3: a bounded history of each site's heartbeats (the dashboard's loss curves).
SCHEMA_VERSION = 3
# Heartbeats kept per site: enough for a loss curve over days at one point a minute or so,
# small enough that months of 10-second beats stay a few MB.
HEARTBEAT_HISTORY = 2000

R = TypeVar("R")
# Builds the audit event of a state change from the record the change produced.
EventFor = Callable[[R], AuditEvent]


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    site: str
    secret_sha256: str
    role: str  # "site" (may enrol) or "reader" (may download the ensemble)
    created_at: float
    expires_at: float
    used_at: float | None = None


@dataclass(frozen=True)
class SiteRecord:
    name: str
    spiffe_id: str
    cert_serial: str  # hex; calls made with any other certificate of this site are refused
    cert_pem: str
    enrolled_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class HeartbeatRecord:
    site: str
    at: float
    phase: str
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class PlanRecord:
    digest: str
    num_experts: int
    created_at: float
    summary_json: str = "{}"


@dataclass(frozen=True)
class ArtifactRecord:
    """A file the coordinator serves; ``path`` is relative to the state directory."""

    name: str
    path: str
    size: int
    sha256: str
    expert: int | None = None  # None: every site may download it; k: only expert k's site
    audience: str = "sites"  # "sites" or "readers" (the published ensemble)


@dataclass(frozen=True)
class AssignmentRecord:
    expert_index: int
    site: str
    plan_digest: str
    assigned_at: float


@dataclass(frozen=True)
class UploadRecord:
    upload_id: str
    site: str
    expert_index: int
    files: tuple[UploadFile, ...]
    received: dict[str, int] = field(default_factory=dict)
    state: str = "open"  # open | accepted | rejected
    reason: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    receipt_json: str = ""  # the audit-log receipt of the acceptance (canonical JSON)


@dataclass(frozen=True)
class AuditRecord:
    """One audit-log entry as stored: the leaf (canonical event bytes) and its hash."""

    index: int
    canonical: bytes
    leaf_hash: bytes

    def event(self) -> AuditEvent:
        """The event these bytes encode."""
        return AuditEvent.from_json(json.loads(self.canonical))


@dataclass(frozen=True)
class EnsembleRecord:
    manifest_json: str
    artifact_names: tuple[str, ...]
    published_at: float


class Store(abc.ABC):
    """Durable federation state. Implementations must be safe for concurrent callers."""

    # -- federation ----------------------------------------------------------------------
    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version this store holds (``SCHEMA_VERSION`` for a current store)."""

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None:
        """A federation-level setting (e.g. ``federation``), or None when unset."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: str, audit: EventFor[str] | None = None) -> None:
        """Sets a federation-level setting, replacing any previous value. ``audit`` gets the
        new value and is called only when the value changes."""

    # -- enrolment tokens and sites ------------------------------------------------------
    @abc.abstractmethod
    def add_token(self, token: TokenRecord, audit: EventFor[TokenRecord] | None = None) -> None:
        """Stores a new token. A token id that already exists MUST raise AlreadyExists.
        ``audit`` gets the stored token."""

    @abc.abstractmethod
    def get_token(self, token_id: str) -> TokenRecord | None:
        """The token with this id, used or not, or None."""

    @abc.abstractmethod
    def enroll_site(
        self,
        token_id: str,
        site: SiteRecord,
        now: float,
        audit: EventFor[SiteRecord] | None = None,
    ) -> SiteRecord:
        """Atomically marks the token used at ``now`` and records (or replaces) the site.

        A token that is unknown or already used MUST raise Unauthenticated and change nothing,
        even when two callers race with the same token. Re-enrolling a site replaces its
        certificate (the old one is refused from then on) and keeps its assignment. ``audit``
        gets the stored site.
        """

    @abc.abstractmethod
    def get_site(self, name: str) -> SiteRecord | None:
        """The enrolled site with this name, or None."""

    @abc.abstractmethod
    def list_sites(self) -> list[SiteRecord]:
        """Every enrolled site, ordered by name."""

    @abc.abstractmethod
    def renew_certificate(
        self,
        name: str,
        old_serial: str,
        site: SiteRecord,
        audit: EventFor[SiteRecord] | None = None,
    ) -> SiteRecord:
        """Replaces the certificate of an enrolled site whose current serial is ``old_serial``
        with ``site.cert_serial`` / ``site.cert_pem`` (other fields stay).

        An unknown site MUST raise NotFound; a revoked site MUST raise PermissionDenied; a
        current serial other than ``old_serial`` (a renewal or re-enrolment won the race) MUST
        raise FailedPrecondition; each changes nothing. ``audit`` gets the renewed site.
        """

    @abc.abstractmethod
    def revoke_site(
        self, name: str, now: float, audit: EventFor[SiteRecord] | None = None
    ) -> SiteRecord:
        """Marks the site revoked (idempotent). An unknown site MUST raise NotFound.

        Revoking a revoked site changes nothing: its ``revoked_at`` stays, and no event is
        appended."""

    # -- heartbeats ----------------------------------------------------------------------
    @abc.abstractmethod
    def record_heartbeat(self, heartbeat: HeartbeatRecord) -> None:
        """Keeps the latest heartbeat of a site, and appends it to the site's history (which
        keeps the newest ``HEARTBEAT_HISTORY``). An unknown site MUST raise NotFound."""

    @abc.abstractmethod
    def heartbeat_history(self, site: str, limit: int = HEARTBEAT_HISTORY) -> list[HeartbeatRecord]:
        """The site's newest ``limit`` heartbeats, oldest first (empty for an unknown site)."""

    @abc.abstractmethod
    def latest_heartbeats(self) -> dict[str, HeartbeatRecord]:
        """The latest heartbeat of every site that sent one, keyed by site name."""

    # -- partition plan and assignments --------------------------------------------------
    @abc.abstractmethod
    def put_plan(self, plan: PlanRecord, audit: EventFor[PlanRecord] | None = None) -> None:
        """Records the partition plan. Storing the same digest again is a no-op (no event);
        replacing the plan once any expert is assigned MUST raise FailedPrecondition.
        ``audit`` gets the new plan."""

    @abc.abstractmethod
    def get_plan(self) -> PlanRecord | None:
        """The current partition plan, or None before partitioning."""

    @abc.abstractmethod
    def assign_expert(
        self, site: str, now: float, audit: EventFor[AssignmentRecord] | None = None
    ) -> AssignmentRecord | None:
        """The site's assignment: its existing slot, else the lowest free slot 0..K-1.

        Returns None when every slot is held by another site. No plan MUST raise
        FailedPrecondition; a site that is not enrolled MUST raise NotFound. Two sites MUST
        never hold the same slot, even when racing. ``audit`` is called only when a slot is
        newly given (a repeated call returns the existing record and appends nothing).
        """

    @abc.abstractmethod
    def get_assignment(self, site: str) -> AssignmentRecord | None:
        """The site's assignment, or None."""

    @abc.abstractmethod
    def list_assignments(self) -> list[AssignmentRecord]:
        """Every assignment, ordered by expert index."""

    # -- artifacts -----------------------------------------------------------------------
    @abc.abstractmethod
    def put_artifact(self, artifact: ArtifactRecord) -> None:
        """Records (or replaces) the artifact with this name."""

    @abc.abstractmethod
    def get_artifact(self, name: str) -> ArtifactRecord | None:
        """The artifact with this name, or None."""

    @abc.abstractmethod
    def list_artifacts(self) -> list[ArtifactRecord]:
        """Every artifact, ordered by name."""

    @abc.abstractmethod
    def remove_artifacts(self, prefix: str) -> int:
        """Stops serving every artifact whose name starts with ``prefix``; returns how many."""

    # -- uploads -------------------------------------------------------------------------
    @abc.abstractmethod
    def begin_upload(
        self, upload: UploadRecord, audit: EventFor[UploadRecord] | None = None
    ) -> UploadRecord:
        """Opens an upload session, or returns the open or accepted one with the same site,
        expert and files (so an interrupted upload resumes with what was already received, and
        a repeated upload of an accepted expert is a no-op). Rejected sessions are not reused.
        ``audit`` is called only when a new session opens (its id is ``upload.upload_id``)."""

    @abc.abstractmethod
    def get_upload(self, upload_id: str) -> UploadRecord | None:
        """The upload session with this id, or None."""

    @abc.abstractmethod
    def list_uploads(self, state: str | None = None) -> list[UploadRecord]:
        """Every upload session (only those in ``state`` when given), oldest first."""

    @abc.abstractmethod
    def advance_upload(self, upload_id: str, path: str, offset: int, length: int) -> int:
        """Records ``length`` more bytes of ``path`` written at ``offset``; returns the new
        received count.

        MUST raise NotFound for an unknown upload or a path not in its file list,
        FailedPrecondition when the session is not open, InvalidArgument when ``offset`` is not
        exactly what was already received or when the file would grow past its declared size.
        """

    @abc.abstractmethod
    def finish_upload(
        self,
        upload_id: str,
        state: str,
        reason: str,
        now: float,
        audit: EventFor[UploadRecord] | None = None,
    ) -> UploadRecord:
        """Closes an open session as ``accepted`` or ``rejected`` with a reason. Finishing a
        session that is already finished MUST raise FailedPrecondition. ``audit`` gets the
        finished record."""

    @abc.abstractmethod
    def set_upload_receipt(self, upload_id: str, receipt_json: str) -> UploadRecord:
        """Keeps the receipt of an accepted upload; the first receipt stays (a later call
        returns the record unchanged), so a repeated commit answers the same receipt.

        MUST raise NotFound for an unknown upload, FailedPrecondition unless it is accepted.
        """

    # -- the audit log -------------------------------------------------------------------
    @abc.abstractmethod
    def append_audit_event(self, event: AuditEvent) -> AuditRecord:
        """Appends ``event`` (for events that record no store change, e.g. ``published``)
        at the next index, assigned atomically: concurrent callers, in this process or
        another, get distinct, dense indexes."""

    @abc.abstractmethod
    def audit_size(self) -> int:
        """The number of events in the log."""

    @abc.abstractmethod
    def audit_events(self, start: int = 0, end: int | None = None) -> list[AuditRecord]:
        """The events with ``start <= index < end`` (default: to the end), in index order."""

    @abc.abstractmethod
    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Keeps a checkpoint the coordinator signed (append-only).

        A checkpoint covering more events than the log holds MUST raise InvalidArgument. One
        smaller than, or dated before, the latest kept checkpoint MUST raise
        FailedPrecondition (another writer signed a later head meanwhile: sign again), so
        kept checkpoints grow in size and time.
        """

    @abc.abstractmethod
    def list_checkpoints(self) -> list[Checkpoint]:
        """Every kept checkpoint, oldest first."""

    # -- the published ensemble ----------------------------------------------------------
    @abc.abstractmethod
    def publish_ensemble(self, ensemble: EnsembleRecord) -> None:
        """Records the published ensemble, replacing any earlier one."""

    @abc.abstractmethod
    def get_ensemble(self) -> EnsembleRecord | None:
        """The published ensemble, or None before assembly."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Releases resources (connections); the default does nothing."""


def open_store(url: str) -> Store:
    """The store at ``url``: ``sqlite:///ABSOLUTE/PATH`` or ``memory://``."""
    if url == "memory://":
        from coordinator.store_memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from coordinator.store_sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"))
    raise ValueError(f"store URL {url!r}: expected 'sqlite:///PATH' or 'memory://'")


def check_finish_upload(upload_id: str, current: UploadRecord | None, state: str) -> None:
    """The :meth:`Store.finish_upload` rules, shared by the backends."""
    if state not in ("accepted", "rejected"):
        raise InvalidArgument(f"upload state {state!r}: expected 'accepted' or 'rejected'")
    if current is None:
        raise NotFound(f"unknown upload id {upload_id!r}")
    if current.state != "open":
        raise FailedPrecondition(f"upload {upload_id} is already {current.state}")


def check_new_checkpoint(latest: Checkpoint | None, new: Checkpoint, log_size: int) -> None:
    """The :meth:`Store.add_checkpoint` rules, shared by the backends."""
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
    if datetime.fromisoformat(new.timestamp) < datetime.fromisoformat(latest.timestamp):
        raise FailedPrecondition(
            f"checkpoint dated {new.timestamp}: the latest checkpoint is dated "
            f"{latest.timestamp}; sign the current head again"
        )
