"""One error hierarchy for both sides; each kind maps to one gRPC status code and exit code."""

from __future__ import annotations

from protocol.exit_codes import ExitCode


class AtollError(Exception):
    """Base class: ``str(error)`` is a message a person can act on.

    ``retry_after`` (seconds) marks an error as transient: the coordinator sends it as the
    ``atoll-retry-after`` trailer and a site waits and tries again instead of giving up.
    """

    grpc_code_name = "INTERNAL"
    exit_code = ExitCode.ERROR
    retry_after: float | None = None

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidArgument(AtollError):
    """The request or input is malformed (names the field and what was expected)."""

    grpc_code_name = "INVALID_ARGUMENT"
    exit_code = ExitCode.BAD_INPUT


class NotFound(AtollError):
    grpc_code_name = "NOT_FOUND"
    exit_code = ExitCode.NOT_FOUND


class AlreadyExists(AtollError):
    grpc_code_name = "ALREADY_EXISTS"
    exit_code = ExitCode.ALREADY_EXISTS


class Unauthenticated(AtollError):
    """Missing, unknown, expired or reused credentials."""

    grpc_code_name = "UNAUTHENTICATED"
    exit_code = ExitCode.AUTH


class PermissionDenied(AtollError):
    """Authenticated, but not allowed to touch this object."""

    grpc_code_name = "PERMISSION_DENIED"
    exit_code = ExitCode.AUTH


class FailedPrecondition(AtollError):
    """The federation is not in a state where this can happen (yet)."""

    grpc_code_name = "FAILED_PRECONDITION"
    exit_code = ExitCode.PRECONDITION


class VerificationFailed(AtollError):
    """A digest, size or signature check failed."""

    grpc_code_name = "DATA_LOSS"
    exit_code = ExitCode.VERIFY_FAILED


class Unavailable(AtollError):
    """The peer cannot be reached (retried with backoff by callers that can wait)."""

    grpc_code_name = "UNAVAILABLE"
    exit_code = ExitCode.UNAVAILABLE


class ResourceExhausted(AtollError):
    """A limit is reached (a quota, the coordinator's disk, concurrent calls): try later."""

    grpc_code_name = "RESOURCE_EXHAUSTED"
    exit_code = ExitCode.UNAVAILABLE
    retry_after = 30.0


class Aborted(AtollError):
    """A concurrent call holds what this one needs (e.g. another stream writes the file)."""

    grpc_code_name = "ABORTED"
    exit_code = ExitCode.UNAVAILABLE
    retry_after = 1.0


class Interrupted(AtollError):
    """The command was told to stop (SIGINT/SIGTERM) while it waited or retried."""

    exit_code = ExitCode.INTERRUPTED


_BY_CODE_NAME: dict[str, type[AtollError]] = {
    cls.grpc_code_name: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Unauthenticated,
        PermissionDenied,
        FailedPrecondition,
        VerificationFailed,
        Unavailable,
        ResourceExhausted,
        Aborted,
    )
}


def error_for_code_name(code_name: str, message: str) -> AtollError:
    """The domain error a gRPC status code stands for (client side)."""
    return _BY_CODE_NAME.get(code_name, AtollError)(message)
