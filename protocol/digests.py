"""Streaming sha256 of files: flat memory whatever the size."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from protocol.errors import InvalidArgument, VerificationFailed

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's contents, read in large blocks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_entry(path: Path) -> dict[str, str | int]:
    """``{"sha256", "size"}`` of one file: an entry of ``atoll_ensemble.json``'s file lists."""
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def folder_digests(folder: Path) -> dict[str, dict[str, str | int]]:
    """``{relative posix path: {"sha256", "size"}}`` of every file under ``folder``, sorted
    (the file lists of ``atoll_ensemble.json``)."""
    return {
        path.relative_to(folder).as_posix(): file_entry(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def check_sha256_hex(value: str, what: str) -> str:
    """Returns ``value`` if it is 64 lowercase hex digits, else names ``what`` in the error."""
    if not _SHA256_HEX.match(value):
        raise InvalidArgument(f"{what}: expected 64 lowercase hex digits (sha256), got {value!r}")
    return value


def verify_file(path: Path, expected_sha256: str, expected_size: int | None = None) -> None:
    """Raises VerificationFailed showing expected vs. actual size or digest."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise VerificationFailed(f"{path.name}: expected {expected_size} bytes, found {size}")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise VerificationFailed(
            f"{path.name}: expected sha256 {expected_sha256[:16]}.., got {actual[:16]}.."
        )
