"""The one file hasher and the one folder hasher: streaming sha256, flat memory whatever the
size.

Every digest of a file in Atoll comes from here: signing and verifying experts, upload
manifests, the ensemble manifest's file lists, assembly's copies (:func:`copy_and_hash`
hashes the very buffer it writes, so the bytes that land are the bytes checked).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from pydantic import Field

from protocol.errors import InvalidArgument, VerificationFailed
from protocol.validation import Sha256Hex, StrictFormat

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
COPY_BLOCK = 1 << 20


class FileDigest(StrictFormat):
    """Size and sha256 of one file (also an entry of ``atoll_ensemble.json``'s file lists,
    hence strict: unknown keys are errors)."""

    sha256: Sha256Hex
    size: int = Field(ge=0)

    def entry(self) -> dict[str, str | int]:
        """``{"sha256", "size"}``, as the manifest writes it."""
        return {"sha256": self.sha256, "size": self.size}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's contents, read in large blocks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_digest(path: Path) -> FileDigest:
    """Size and sha256 of one file."""
    return FileDigest(sha256=file_sha256(path), size=path.stat().st_size)


def file_entry(path: Path) -> dict[str, str | int]:
    """``{"sha256", "size"}`` of one file: an entry of ``atoll_ensemble.json``'s file lists."""
    return file_digest(path).entry()


def copy_and_hash(source: Path, destination: Path) -> FileDigest:
    """Copies ``source`` to ``destination``, hashing each block as it is written: one read of
    the bytes, and the digest is of exactly the bytes that were written."""
    hasher = hashlib.sha256()
    size = 0
    with source.open("rb") as reader, destination.open("wb") as writer:
        while block := reader.read(COPY_BLOCK):
            hasher.update(block)
            writer.write(block)
            size += len(block)
    return FileDigest(sha256=hasher.hexdigest(), size=size)


def copy_folder(source: Path, destination: Path) -> dict[str, FileDigest]:
    """Copies every file below ``source`` (see :func:`folder_files`) to the same place below
    ``destination`` with :func:`copy_and_hash`; returns their digests in path order."""
    copied: dict[str, FileDigest] = {}
    for relative, path in folder_files(source):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        copied[relative] = copy_and_hash(path, target)
    return copied


def folder_files(folder: Path, skip: Iterable[str] = ()) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of every file below ``folder`` in path order
    (component by component, as model_signing sorts), leaving out the relative paths in
    ``skip`` (a directory name leaves out all below it).

    Raises:
        InvalidArgument: ``folder`` is not a directory, or holds a symlink or special file
            (neither is signed nor served).
    """
    if not folder.is_dir():
        raise InvalidArgument(f"{folder}: expected a directory")
    skipped = frozenset(skip)
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if any(relative == s or relative.startswith(s + "/") for s in skipped):
                if name in dirs:
                    dirs.remove(name)
                continue
            if path.is_symlink():
                raise InvalidArgument(f"{relative}: symbolic links are not signed")
            if name in files:
                if not path.is_file():
                    raise InvalidArgument(f"{relative}: not a regular file")
                found.append((relative, path))
    return sorted(found, key=lambda item: PurePosixPath(item[0]).parts)


def hash_folder(
    folder: Path,
    *,
    skip: Iterable[str] = (),
    known: Mapping[str, str] | None = None,
    max_workers: int | None = None,
) -> dict[str, FileDigest]:
    """sha256 and size of every file below ``folder`` (see :func:`folder_files`), in path
    order.

    Files are hashed in parallel threads (hashlib releases the GIL on large buffers), so a
    sharded checkpoint hashes at the speed of all cores.

    Args:
        folder: The directory.
        skip: Relative paths left out (a directory name leaves out all below it).
        known: Hex sha256 the caller has already established for some files (the
            coordinator hashed them as they arrived, or as it copied them); those files are
            not read again (their size comes from the file system).
        max_workers: Threads; default cores + 4 (as ``ThreadPoolExecutor``).

    Returns:
        Relative POSIX path -> digest.
    """
    paths = folder_files(folder, skip)
    known = known or {}
    todo = [(relative, path) for relative, path in paths if relative not in known]
    # More threads than cores keeps a read in flight while the others hash.
    workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        hashed = dict(
            zip([r for r, _ in todo], pool.map(file_digest, [p for _, p in todo]), strict=True)
        )
    for relative, path in paths:
        if relative in known:
            hashed[relative] = FileDigest(sha256=known[relative], size=path.stat().st_size)
    return {relative: hashed[relative] for relative, _ in paths}


def folder_digests(
    folder: Path, known: Mapping[str, str] | None = None
) -> dict[str, dict[str, str | int]]:
    """``{relative posix path: {"sha256", "size"}}`` of every file under ``folder`` in path
    order (the file lists of ``atoll_ensemble.json``)."""
    return {name: digest.entry() for name, digest in hash_folder(folder, known=known).items()}


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
