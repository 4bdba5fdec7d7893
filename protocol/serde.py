"""Conversions between generated protobuf types and ``protocol.messages`` dataclasses."""

from __future__ import annotations

from protocol import federation_pb2 as pb
from protocol.messages import (
    ArtifactRef,
    AssignmentReply,
    AssignmentStatus,
    CommitResult,
    Directive,
    Enrolment,
    EnsembleInfo,
    Heartbeat,
    HeartbeatReply,
    UploadChunk,
    UploadFile,
    UploadStatus,
)

_STATUS_TO_PB = {
    AssignmentStatus.PENDING: pb.GetAssignmentResponse.PENDING,
    AssignmentStatus.ASSIGNED: pb.GetAssignmentResponse.ASSIGNED,
    AssignmentStatus.NO_SLOT: pb.GetAssignmentResponse.NO_SLOT,
}
_STATUS_FROM_PB = {value: key for key, value in _STATUS_TO_PB.items()}
_DIRECTIVE_TO_PB = {
    Directive.CONTINUE: pb.HeartbeatResponse.CONTINUE,
    Directive.STOP: pb.HeartbeatResponse.STOP,
}
_DIRECTIVE_FROM_PB = {value: key for key, value in _DIRECTIVE_TO_PB.items()}


def artifact_to_pb(ref: ArtifactRef) -> pb.ArtifactRef:
    return pb.ArtifactRef(name=ref.name, size=ref.size, sha256=ref.sha256)


def artifact_from_pb(msg: pb.ArtifactRef) -> ArtifactRef:
    return ArtifactRef(name=msg.name, size=msg.size, sha256=msg.sha256)


def enrolment_to_pb(value: Enrolment) -> pb.EnrollResponse:
    return pb.EnrollResponse(
        certificate_pem=value.certificate_pem,
        ca_certificate_pem=value.ca_certificate_pem,
        federation=value.federation,
        spiffe_id=value.spiffe_id,
    )


def enrolment_from_pb(msg: pb.EnrollResponse) -> Enrolment:
    return Enrolment(
        certificate_pem=msg.certificate_pem,
        ca_certificate_pem=msg.ca_certificate_pem,
        federation=msg.federation,
        spiffe_id=msg.spiffe_id,
    )


def assignment_to_pb(value: AssignmentReply) -> pb.GetAssignmentResponse:
    return pb.GetAssignmentResponse(
        status=_STATUS_TO_PB[value.status],
        reason=value.reason,
        retry_after_seconds=value.retry_after_seconds,
        expert_index=value.expert_index,
        num_experts=value.num_experts,
        plan_digest=value.plan_digest,
        assignment_digest=value.assignment_digest,
        artifacts=[artifact_to_pb(a) for a in value.artifacts],
        assignment_json=value.assignment_json,
    )


def assignment_from_pb(msg: pb.GetAssignmentResponse) -> AssignmentReply:
    if msg.status not in _STATUS_FROM_PB:
        raise ValueError(f"GetAssignmentResponse.status: unknown value {msg.status}")
    return AssignmentReply(
        status=_STATUS_FROM_PB[msg.status],
        reason=msg.reason,
        retry_after_seconds=msg.retry_after_seconds,
        expert_index=msg.expert_index,
        num_experts=msg.num_experts,
        plan_digest=msg.plan_digest,
        assignment_digest=msg.assignment_digest,
        artifacts=tuple(artifact_from_pb(a) for a in msg.artifacts),
        assignment_json=msg.assignment_json,
    )


def heartbeat_to_pb(value: Heartbeat) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(
        phase=value.phase,
        step=value.step,
        total_steps=value.total_steps,
        loss=value.loss,
        tokens_per_second=value.tokens_per_second,
        eta_seconds=value.eta_seconds,
        message=value.message,
    )


def heartbeat_from_pb(msg: pb.HeartbeatRequest) -> Heartbeat:
    return Heartbeat(
        phase=msg.phase,
        step=msg.step,
        total_steps=msg.total_steps,
        loss=msg.loss,
        tokens_per_second=msg.tokens_per_second,
        eta_seconds=msg.eta_seconds,
        message=msg.message,
    )


def heartbeat_reply_to_pb(value: HeartbeatReply) -> pb.HeartbeatResponse:
    return pb.HeartbeatResponse(
        directive=_DIRECTIVE_TO_PB[value.directive],
        next_heartbeat_seconds=value.next_heartbeat_seconds,
        message=value.message,
    )


def heartbeat_reply_from_pb(msg: pb.HeartbeatResponse) -> HeartbeatReply:
    return HeartbeatReply(
        directive=_DIRECTIVE_FROM_PB.get(msg.directive, Directive.CONTINUE),
        next_heartbeat_seconds=msg.next_heartbeat_seconds,
        message=msg.message,
    )


def upload_files_to_pb(files: list[UploadFile]) -> list[pb.UploadFile]:
    return [pb.UploadFile(path=f.path, size=f.size, sha256=f.sha256) for f in files]


def upload_files_from_pb(msgs: list[pb.UploadFile]) -> list[UploadFile]:
    return [UploadFile(path=m.path, size=m.size, sha256=m.sha256) for m in msgs]


def received_to_pb(received: dict[str, int]) -> list[pb.ReceivedFile]:
    return [pb.ReceivedFile(path=p, received=n) for p, n in sorted(received.items())]


def received_from_pb(msgs: list[pb.ReceivedFile]) -> dict[str, int]:
    return {m.path: m.received for m in msgs}


def upload_status_to_pb(value: UploadStatus) -> pb.BeginUploadResponse:
    return pb.BeginUploadResponse(
        upload_id=value.upload_id, state=value.state, received=received_to_pb(value.received)
    )


def upload_status_from_pb(msg: pb.BeginUploadResponse) -> UploadStatus:
    return UploadStatus(
        upload_id=msg.upload_id, state=msg.state, received=received_from_pb(list(msg.received))
    )


def chunk_to_pb(value: UploadChunk) -> pb.UploadChunkRequest:
    return pb.UploadChunkRequest(
        upload_id=value.upload_id, path=value.path, offset=value.offset, data=value.data
    )


def chunk_from_pb(msg: pb.UploadChunkRequest) -> UploadChunk:
    return UploadChunk(upload_id=msg.upload_id, path=msg.path, offset=msg.offset, data=msg.data)


def commit_to_pb(value: CommitResult) -> pb.CommitUploadResponse:
    return pb.CommitUploadResponse(
        accepted=value.accepted, reason=value.reason, receipt_json=value.receipt_json
    )


def commit_from_pb(msg: pb.CommitUploadResponse) -> CommitResult:
    return CommitResult(accepted=msg.accepted, reason=msg.reason, receipt_json=msg.receipt_json)


def ensemble_to_pb(value: EnsembleInfo) -> pb.GetEnsembleResponse:
    return pb.GetEnsembleResponse(
        ready=value.ready,
        reason=value.reason,
        manifest_json=value.manifest_json,
        artifacts=[artifact_to_pb(a) for a in value.artifacts],
    )


def ensemble_from_pb(msg: pb.GetEnsembleResponse) -> EnsembleInfo:
    return EnsembleInfo(
        ready=msg.ready,
        reason=msg.reason,
        manifest_json=msg.manifest_json,
        artifacts=tuple(artifact_from_pb(a) for a in msg.artifacts),
    )
