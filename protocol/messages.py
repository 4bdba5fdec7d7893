"""Plain dataclasses for what crosses the wire; ``serde`` converts them to and from protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

PHASES = (
    "waiting",
    "assigned",
    "downloading",
    "ready",
    "training",
    "signing",
    "uploading",
    "done",
    "failed",
)


@dataclass(frozen=True)
class ArtifactRef:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Enrolment:
    certificate_pem: bytes
    ca_certificate_pem: bytes
    federation: str
    spiffe_id: str


class AssignmentStatus(Enum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    NO_SLOT = "no_slot"


@dataclass(frozen=True)
class AssignmentReply:
    status: AssignmentStatus
    reason: str = ""
    retry_after_seconds: int = 0
    expert_index: int = 0
    num_experts: int = 0
    plan_digest: str = ""
    assignment_digest: str = ""
    artifacts: tuple[ArtifactRef, ...] = ()
    assignment_json: str = ""


@dataclass(frozen=True)
class Heartbeat:
    phase: str
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float = 0.0
    message: str = ""


class Directive(Enum):
    CONTINUE = "continue"
    STOP = "stop"


@dataclass(frozen=True)
class HeartbeatReply:
    directive: Directive
    next_heartbeat_seconds: int
    message: str = ""


@dataclass(frozen=True)
class UploadFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class UploadStatus:
    upload_id: str
    state: str
    received: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadChunk:
    upload_id: str
    path: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class CommitResult:
    accepted: bool
    reason: str = ""
    receipt_json: str = ""


@dataclass(frozen=True)
class EnsembleInfo:
    ready: bool
    reason: str = ""
    manifest_json: str = ""
    artifacts: tuple[ArtifactRef, ...] = ()
