"""The coordinator's durable state behind one interface.

Every backend implements :class:`Store`; its docstrings are the contract, and
``tests/test_store.py`` runs one test class against every backend. ``open_store`` picks the
backend from a URL: ``sqlite:///path/to/store.db`` (the real one, WAL mode) or ``memory://``.

Times are POSIX seconds (float). Methods raise ``protocol.errors`` exceptions; a method that
raises changes nothing.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from protocol.messages import UploadFile

SCHEMA_VERSION = 1


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
    def set_meta(self, key: str, value: str) -> None:
        """Sets a federation-level setting, replacing any previous value."""

    # -- enrolment tokens and sites ------------------------------------------------------
    @abc.abstractmethod
    def add_token(self, token: TokenRecord) -> None:
        """Stores a new token. A token id that already exists MUST raise AlreadyExists."""

    @abc.abstractmethod
    def get_token(self, token_id: str) -> TokenRecord | None:
        """The token with this id, used or not, or None."""

    @abc.abstractmethod
    def enroll_site(self, token_id: str, site: SiteRecord, now: float) -> SiteRecord:
        """Atomically marks the token used at ``now`` and records (or replaces) the site.

        A token that is unknown or already used MUST raise Unauthenticated and change nothing,
        even when two callers race with the same token. Re-enrolling a site replaces its
        certificate (the old one is refused from then on) and keeps its assignment.
        """

    @abc.abstractmethod
    def get_site(self, name: str) -> SiteRecord | None:
        """The enrolled site with this name, or None."""

    @abc.abstractmethod
    def list_sites(self) -> list[SiteRecord]:
        """Every enrolled site, ordered by name."""

    @abc.abstractmethod
    def revoke_site(self, name: str, now: float) -> SiteRecord:
        """Marks the site revoked (idempotent). An unknown site MUST raise NotFound."""

    # -- heartbeats ----------------------------------------------------------------------
    @abc.abstractmethod
    def record_heartbeat(self, heartbeat: HeartbeatRecord) -> None:
        """Keeps the latest heartbeat of a site. An unknown site MUST raise NotFound."""

    @abc.abstractmethod
    def latest_heartbeats(self) -> dict[str, HeartbeatRecord]:
        """The latest heartbeat of every site that sent one, keyed by site name."""

    # -- partition plan and assignments --------------------------------------------------
    @abc.abstractmethod
    def put_plan(self, plan: PlanRecord) -> None:
        """Records the partition plan. Storing the same digest again is a no-op; replacing the
        plan once any expert is assigned MUST raise FailedPrecondition."""

    @abc.abstractmethod
    def get_plan(self) -> PlanRecord | None:
        """The current partition plan, or None before partitioning."""

    @abc.abstractmethod
    def assign_expert(self, site: str, now: float) -> AssignmentRecord | None:
        """The site's assignment: its existing slot, else the lowest free slot 0..K-1.

        Returns None when every slot is held by another site. No plan MUST raise
        FailedPrecondition; a site that is not enrolled MUST raise NotFound. Two sites MUST never hold the same slot, even when racing.
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
    def begin_upload(self, upload: UploadRecord) -> UploadRecord:
        """Opens an upload session, or returns the open or accepted one with the same site,
        expert and files (so an interrupted upload resumes with what was already received, and
        a repeated upload of an accepted expert is a no-op). Rejected sessions are not reused."""

    @abc.abstractmethod
    def get_upload(self, upload_id: str) -> UploadRecord | None:
        """The upload session with this id, or None."""

    @abc.abstractmethod
    def advance_upload(self, upload_id: str, path: str, offset: int, length: int) -> int:
        """Records ``length`` more bytes of ``path`` written at ``offset``; returns the new
        received count.

        MUST raise NotFound for an unknown upload or a path not in its file list,
        FailedPrecondition when the session is not open, InvalidArgument when ``offset`` is not
        exactly what was already received or when the file would grow past its declared size.
        """

    @abc.abstractmethod
    def finish_upload(self, upload_id: str, state: str, reason: str, now: float) -> UploadRecord:
        """Closes an open session as ``accepted`` or ``rejected`` with a reason. Finishing a
        session that is already finished MUST raise FailedPrecondition."""

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
