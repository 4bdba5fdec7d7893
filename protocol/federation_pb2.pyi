from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token", "site_name", "csr_pem")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SITE_NAME_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    token: str
    site_name: str
    csr_pem: bytes
    def __init__(self, token: _Optional[str] = ..., site_name: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_certificate_pem", "federation", "spiffe_id")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_certificate_pem: bytes
    federation: str
    spiffe_id: str
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_certificate_pem: _Optional[bytes] = ..., federation: _Optional[str] = ..., spiffe_id: _Optional[str] = ...) -> None: ...

class ArtifactRef(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetAssignmentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetAssignmentResponse(_message.Message):
    __slots__ = ("status", "reason", "retry_after_seconds", "expert_index", "num_experts", "plan_digest", "assignment_digest", "artifacts", "assignment_json")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[GetAssignmentResponse.Status]
        PENDING: _ClassVar[GetAssignmentResponse.Status]
        ASSIGNED: _ClassVar[GetAssignmentResponse.Status]
        NO_SLOT: _ClassVar[GetAssignmentResponse.Status]
    STATUS_UNSPECIFIED: GetAssignmentResponse.Status
    PENDING: GetAssignmentResponse.Status
    ASSIGNED: GetAssignmentResponse.Status
    NO_SLOT: GetAssignmentResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PLAN_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    status: GetAssignmentResponse.Status
    reason: str
    retry_after_seconds: int
    expert_index: int
    num_experts: int
    plan_digest: str
    assignment_digest: str
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactRef]
    assignment_json: str
    def __init__(self, status: _Optional[_Union[GetAssignmentResponse.Status, str]] = ..., reason: _Optional[str] = ..., retry_after_seconds: _Optional[int] = ..., expert_index: _Optional[int] = ..., num_experts: _Optional[int] = ..., plan_digest: _Optional[str] = ..., assignment_digest: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[ArtifactRef, _Mapping]]] = ..., assignment_json: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("phase", "step", "total_steps", "loss", "tokens_per_second", "eta_seconds", "message")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    step: int
    total_steps: int
    loss: float
    tokens_per_second: float
    eta_seconds: float
    message: str
    def __init__(self, phase: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("directive", "next_heartbeat_seconds", "message")
    class Directive(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DIRECTIVE_UNSPECIFIED: _ClassVar[HeartbeatResponse.Directive]
        CONTINUE: _ClassVar[HeartbeatResponse.Directive]
        STOP: _ClassVar[HeartbeatResponse.Directive]
    DIRECTIVE_UNSPECIFIED: HeartbeatResponse.Directive
    CONTINUE: HeartbeatResponse.Directive
    STOP: HeartbeatResponse.Directive
    DIRECTIVE_FIELD_NUMBER: _ClassVar[int]
    NEXT_HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    directive: HeartbeatResponse.Directive
    next_heartbeat_seconds: int
    message: str
    def __init__(self, directive: _Optional[_Union[HeartbeatResponse.Directive, str]] = ..., next_heartbeat_seconds: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DownloadArtifactRequest(_message.Message):
    __slots__ = ("name", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadArtifactResponse(_message.Message):
    __slots__ = ("artifact", "offset", "data")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    artifact: ArtifactRef
    offset: int
    data: bytes
    def __init__(self, artifact: _Optional[_Union[ArtifactRef, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadFile(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class BeginUploadRequest(_message.Message):
    __slots__ = ("expert_index", "files")
    EXPERT_INDEX_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    expert_index: int
    files: _containers.RepeatedCompositeFieldContainer[UploadFile]
    def __init__(self, expert_index: _Optional[int] = ..., files: _Optional[_Iterable[_Union[UploadFile, _Mapping]]] = ...) -> None: ...

class ReceivedFile(_message.Message):
    __slots__ = ("path", "received")
    PATH_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    path: str
    received: int
    def __init__(self, path: _Optional[str] = ..., received: _Optional[int] = ...) -> None: ...

class BeginUploadResponse(_message.Message):
    __slots__ = ("upload_id", "received", "state")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    received: _containers.RepeatedCompositeFieldContainer[ReceivedFile]
    state: str
    def __init__(self, upload_id: _Optional[str] = ..., received: _Optional[_Iterable[_Union[ReceivedFile, _Mapping]]] = ..., state: _Optional[str] = ...) -> None: ...

class UploadChunkRequest(_message.Message):
    __slots__ = ("upload_id", "path", "offset", "data")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    path: str
    offset: int
    data: bytes
    def __init__(self, upload_id: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadChunkResponse(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: _containers.RepeatedCompositeFieldContainer[ReceivedFile]
    def __init__(self, received: _Optional[_Iterable[_Union[ReceivedFile, _Mapping]]] = ...) -> None: ...

class CommitUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CommitUploadResponse(_message.Message):
    __slots__ = ("accepted", "reason", "receipt_json")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_JSON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    receipt_json: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., receipt_json: _Optional[str] = ...) -> None: ...

class GetEnsembleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetEnsembleResponse(_message.Message):
    __slots__ = ("ready", "reason", "manifest_json", "artifacts")
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    reason: str
    manifest_json: str
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactRef]
    def __init__(self, ready: _Optional[bool] = ..., reason: _Optional[str] = ..., manifest_json: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[ArtifactRef, _Mapping]]] = ...) -> None: ...

class RenewCertificateRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class RenewCertificateResponse(_message.Message):
    __slots__ = ("certificate_pem", "expires_at")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    expires_at: float
    def __init__(self, certificate_pem: _Optional[bytes] = ..., expires_at: _Optional[float] = ...) -> None: ...
