"""Upload sessions: begin (manifest of files), commit, prune; the chunks between are
:mod:`coordinator.upload_writer`'s.

Integrity: commit checks every file's size and sha256 (the digest computed while the file
streamed in, else a fresh hash) and any extra :data:`AcceptanceCheck`. Accepted files, and
their directories, are fsynced before the acceptance is recorded.

Quotas (:class:`UploadQuota`): a site holds at most ``max_open`` open sessions declaring at
most ``max_bytes`` in all; files are at most ``MAX_FILE_BYTES``. Rejected sessions' files are
deleted at once; sessions with no new data for ``UploadQuota.abandon_after`` are rejected as
abandoned and deleted by :func:`prune` (the server runs it hourly; `coordinator uploads
--prune` on demand).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from coordinator import audit, faults
from coordinator.state import StateDir
from coordinator.store import SiteRecord, Store, UploadRecord
from coordinator.upload_writer import UploadWriter, owned_upload, upload_files_dir
from protocol.digests import check_sha256_hex, file_sha256
from protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from protocol.messages import CommitResult, UploadFile, UploadStatus

log = logging.getLogger("atoll.coordinator")

MAX_FILES = 10_000
MAX_FILE_BYTES = 1 << 40  # 1 TiB: far past any expert checkpoint, far below SQLite's 2^63
MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255  # one path component (the usual file system limit)


@dataclass(frozen=True)
class UploadQuota:
    """What one site may hold in open upload sessions.

    Attributes:
        max_open: Open sessions at once (a resumed upload reuses its session).
        max_bytes: Bytes declared by its open sessions together.
        abandon_after: Seconds without new data after which an open session is abandoned.
    """

    max_open: int = 4
    max_bytes: int = 512 << 30
    abandon_after: float = 7 * 86400.0


# begin() checks the quota and opens a session in two steps: one at a time.
_begin_lock = threading.Lock()

# Extra checks run on an upload whose sizes and digests are right (signatures, provenance):
# each returns None to accept or a reason naming the check and file to reject.
AcceptanceCheck = Callable[[UploadRecord, Path], "str | None"]


def check_upload_path(path: str) -> str:
    """A relative POSIX path that stays inside the upload directory."""
    pure = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or "\x00" in path
        or pure.is_absolute()
        or any(part in ("..", ".", "") for part in path.split("/"))
    ):
        raise InvalidArgument(
            f"upload file path {path!r}: expected a relative POSIX path without '..' or '.'"
        )
    longest = max(len(part.encode()) for part in path.split("/"))
    if len(path.encode()) > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        raise InvalidArgument(
            f"upload file path {path[:60]!r}..: expected at most {MAX_PATH_BYTES} bytes, "
            f"{MAX_NAME_BYTES} per name (got {len(path.encode())}, longest name {longest})"
        )
    return path


def begin(
    state: StateDir,
    store: Store,
    site: SiteRecord,
    expert_index: int,
    files: list[UploadFile],
    now: float | None = None,
    quota: UploadQuota | None = None,
) -> UploadStatus:
    """Opens a session for the site's own expert, or resumes the open one for these files.

    A new session past the site's :class:`UploadQuota` raises ResourceExhausted."""
    assignment = store.get_assignment(site.name)
    if assignment is None or assignment.expert_index != expert_index:
        held = "no expert" if assignment is None else f"expert {assignment.expert_index}"
        raise PermissionDenied(
            f"site {site.name!r} holds {held}; it cannot upload expert {expert_index}"
        )
    if not files:
        raise InvalidArgument("BeginUploadRequest.files: expected at least one file")
    if len(files) > MAX_FILES:
        raise InvalidArgument(f"BeginUploadRequest.files: {len(files)} files, at most {MAX_FILES}")
    seen: set[str] = set()
    for item in files:
        check_upload_path(item.path)
        check_sha256_hex(item.sha256, f"BeginUploadRequest.files[{item.path!r}].sha256")
        if not 0 <= item.size <= MAX_FILE_BYTES:
            raise InvalidArgument(
                f"BeginUploadRequest.files[{item.path!r}].size {item.size}: expected 0 to "
                f"{MAX_FILE_BYTES} bytes"
            )
        if item.path in seen:
            raise InvalidArgument(f"BeginUploadRequest.files: {item.path!r} listed twice")
        seen.add(item.path)
    with _begin_lock:
        _check_quota(store, site, files, quota or UploadQuota())
        record = store.begin_upload(
            UploadRecord(
                upload_id=uuid.uuid4().hex,
                site=site.name,
                expert_index=expert_index,
                files=tuple(files),
                created_at=time.time() if now is None else now,
            ),
            audit=audit.upload_begun_event,
        )
    upload_files_dir(state, record.upload_id).mkdir(parents=True, exist_ok=True)
    return UploadStatus(record.upload_id, record.state, dict(record.received))


def _check_quota(
    store: Store, site: SiteRecord, files: list[UploadFile], quota: UploadQuota
) -> None:
    """Raises ResourceExhausted when a new session for ``files`` would put the site past
    its quota (resuming the session these files already have is always allowed)."""
    mine = [u for u in store.list_uploads("open") if u.site == site.name]
    if any(u.files == tuple(files) for u in mine):
        return  # store.begin_upload resumes it
    held = sum(f.size for u in mine for f in u.files)
    wanted = sum(f.size for f in files)
    if len(mine) >= quota.max_open:
        raise ResourceExhausted(
            f"site {site.name!r} has {len(mine)} open upload sessions, the most allowed: "
            "finish or abandon one first"
        )
    if held + wanted > quota.max_bytes:
        raise ResourceExhausted(
            f"site {site.name!r}: {wanted} more bytes would put its open uploads at "
            f"{held + wanted} bytes, past its quota of {quota.max_bytes}"
        )


def _finished_result(record: UploadRecord, auditor: audit.Auditor) -> CommitResult:
    if record.state == "accepted":
        return CommitResult(True, "", auditor.upload_receipt(record))
    return CommitResult(False, record.reason)


def commit(
    state: StateDir,
    store: Store,
    writer: UploadWriter,
    site: SiteRecord,
    upload_id: str,
    checks: Iterable[AcceptanceCheck] = (),
    now: float | None = None,
    *,
    auditor: audit.Auditor,
) -> CommitResult:
    """Accepts the upload if every file is complete and matches its declared digest and
    every check passes.

    An incomplete upload is answered (not accepted) and stays open; a wrong size or digest, or
    a failed extra check, rejects it for good. Both outcomes are recorded in the audit log
    with the state change; an acceptance answers a receipt (event, inclusion proof, signed
    checkpoint). Committing a finished upload again answers the same result and the same
    receipt (idempotent).
    """
    record = owned_upload(store, site, upload_id)
    if record.state != "open":
        return _finished_result(record, auditor)
    missing = [
        f"{f.path} ({record.received[f.path]}/{f.size} bytes)"
        for f in record.files
        if record.received[f.path] != f.size
    ]
    if missing:
        return CommitResult(False, f"upload {upload_id} is incomplete: {', '.join(missing)}")
    root = upload_files_dir(state, upload_id)
    reason = _check_files(root, record, writer)
    if reason is None:
        for check in checks:
            reason = check(record, root)
            if reason is not None:
                break
    when = time.time() if now is None else now
    writer.forget(upload_id)
    try:
        if reason is not None:
            store.finish_upload(upload_id, "rejected", reason, when, audit=audit.rejected_event)
            delete_files(state, upload_id, reason)
            return CommitResult(False, reason)
        provenance = audit.provenance_details(root, site)
        _fsync_tree(root)  # on disk before the log says so
        finished = store.finish_upload(
            upload_id,
            "accepted",
            "",
            when,
            audit=lambda done: audit.accepted_event(done, provenance),
        )
    except FailedPrecondition:
        # A concurrent commit of the same upload finished it first: answer its outcome.
        return _finished_result(owned_upload(store, site, upload_id), auditor)
    faults.point("commit-recorded")
    return CommitResult(True, "", auditor.upload_receipt(finished))


def _fsync_tree(root: Path) -> None:
    """fsyncs every file under ``root`` and every directory from ``root`` up to the
    uploads directory (so the files' names survive a power loss too)."""
    directories = [root, root.parent, root.parent.parent]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            directories.append(path)
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def delete_files(state: StateDir, upload_id: str, why: str) -> bool:
    """Deletes a finished session's files (kept: its record and audit events); returns
    whether there was anything to delete."""
    directory = state.uploads_dir / upload_id
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    log.info("[Uploads] deleted the files of upload %s (%s)", upload_id, why)
    return True


def last_activity(state: StateDir, record: UploadRecord) -> float:
    """When the session last received data: its newest file's mtime, else its creation."""
    root = upload_files_dir(state, record.upload_id)
    times = [record.created_at]
    if root.exists():
        times += [p.stat().st_mtime for p in root.rglob("*") if p.is_file()]
    return max(times)


def prune(
    state: StateDir, store: Store, quota: UploadQuota | None = None, now: float | None = None
) -> list[str]:
    """Rejects open sessions idle past ``quota.abandon_after`` as abandoned (audited) and
    deletes their files and any rejected session's files still on disk; returns the ids
    whose files were deleted."""
    quota = quota or UploadQuota()
    now = time.time() if now is None else now
    deleted = []
    for record in store.list_uploads():
        reason = record.reason or "rejected"
        if record.state == "open":
            idle = now - last_activity(state, record)
            if idle < quota.abandon_after:
                continue
            reason = f"abandoned: no data for {idle / 3600:.1f} h"
            try:
                store.finish_upload(
                    record.upload_id, "rejected", reason, now, audit=audit.rejected_event
                )
            except FailedPrecondition:
                continue  # committed meanwhile
            log.warning("[Uploads] upload %s of %s %s", record.upload_id, record.site, reason)
        elif record.state != "rejected":
            continue
        if delete_files(state, record.upload_id, reason):
            deleted.append(record.upload_id)
    return deleted


def _check_files(root: Path, record: UploadRecord, writer: UploadWriter) -> str | None:
    for item in record.files:
        path = root / item.path
        size = path.stat().st_size if path.exists() else -1
        if size != item.size:
            return f"size mismatch for {item.path}: expected {item.size} bytes, found {size}"
        actual = writer.streamed_digest(record.upload_id, item.path) or file_sha256(path)
        if actual != item.sha256:
            return (
                f"digest mismatch for {item.path}: expected sha256 {item.sha256[:16]}.., "
                f"got {actual[:16]}.."
            )
    return None
