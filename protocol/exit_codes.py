"""The one table of process exit codes used by every Atoll command."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # unexpected failure (a bug or an environment problem)
    USAGE = 2  # bad command line (argparse's own code)
    BAD_INPUT = 3  # a file, field or value is malformed
    NOT_FOUND = 4
    ALREADY_EXISTS = 5  # e.g. a second `coordinator init` on the same state dir
    AUTH = 6  # credentials missing, wrong, expired, reused or revoked
    PRECONDITION = 7  # the federation is not in a state that allows this yet
    VERIFY_FAILED = 8  # digest, size or signature mismatch
    UNAVAILABLE = 9  # the coordinator could not be reached
    INTERRUPTED = 130
