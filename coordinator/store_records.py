"""What the coordinator's store holds: one frozen record per row kind, and the audit hook.

:class:`coordinator.store.Store` takes and returns these; every table module builds them from
its rows. Times are POSIX seconds (float).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from protocol.audit_log import AuditEvent
from protocol.messages import UploadFile

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
