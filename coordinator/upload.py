"""Upload sessions: begin (manifest of files), chunks written straight to disk, commit.

Files land in ``STATE/uploads/<id>/files/<path>``, each written with ``pwrite`` at the offset
the store says was received, so memory stays flat whatever the file size and an interrupted
upload resumes exactly where the coordinator's record says it stopped.

Integrity: one stream at a time writes a file (a second is refused with ABORTED, which sites
retry), so a digest computed while a stream wrote the whole file is the digest of what is on
disk; any other file is hashed again at commit. Accepted files, and their directories, are
fsynced before the acceptance is recorded.

Quotas (:class:`UploadQuota`): a site holds at most ``max_open`` open sessions declaring at
most ``max_bytes`` in all; files are at most ``MAX_FILE_BYTES``. Rejected sessions' files are
deleted at once; sessions with no new data for ``UploadQuota.abandon_after`` are rejected as
abandoned and deleted by :func:`prune` (the server runs it hourly; `coordinator uploads
--prune` on demand).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from coordinator import audit, faults
from coordinator.state import StateDir
from coordinator.store import SiteRecord, Store, UploadRecord
from protocol.digests import check_sha256_hex, file_sha256
from protocol.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from protocol.messages import CommitResult, UploadChunk, UploadFile, UploadStatus

log = logging.getLogger("atoll.coordinator")

MAX_FILES = 10_000
MAX_CHUNK = 8 << 20
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


def upload_files_dir(state: StateDir, upload_id: str) -> Path:
    return state.uploads_dir / upload_id / "files"


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


def _owned(store: Store, site: SiteRecord, upload_id: str) -> UploadRecord:
    record = store.get_upload(upload_id)
    # Another site's upload id gets the same answer as an unknown one.
    if record is None or record.site != site.name:
        raise NotFound(f"unknown upload id {upload_id!r}")
    return record


@dataclass
class _OpenFile:
    fd: int
    size: int
    received: int  # written to disk in this stream (from where the store said to start)
    persisted: int  # recorded in the store; a crash resumes from here
    # Hashes the bytes as they arrive when the file is streamed from offset 0 in one go,
    # so commit need not read it back; None once a resume breaks that sequence.
    hasher: hashlib._Hash | None = None
    hashing: Future[None] | None = None


# The store records progress every this many bytes (and at the end of every stream): one
# SQLite transaction per chunk would cost more than the chunk's own write.
PERSIST_EVERY = 32 << 20


class UploadWriter:
    """Receives chunk streams; one per server, shared by its threads."""

    def __init__(self, state: StateDir, store: Store) -> None:
        self._state = state
        self._store = store
        self._lock = threading.Lock()
        self._writing: set[tuple[str, str]] = set()  # files a stream holds open
        self._digests: dict[tuple[str, str], str] = {}
        # Where bytes reach the disk (a test swaps in a full disk here).
        self.write_at: Callable[[int, bytes, int], int] = os.pwrite
        # hashlib releases the GIL: hashing one chunk overlaps receiving the next.
        self._hashers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="upload-hash")

    def _claim(self, key: tuple[str, str]) -> None:
        """Makes this stream the file's one writer (until :meth:`_release`)."""
        with self._lock:
            if key in self._writing:
                raise Aborted(
                    f"upload {key[0]}: another stream is writing {key[1]!r}; try again once it ends"
                )
            self._writing.add(key)
            self._digests.pop(key, None)

    def _release(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._writing.discard(key)

    def write(self, site: SiteRecord, chunks: Iterable[UploadChunk]) -> dict[str, int]:
        """Writes a stream of chunks; returns what is received of every file of the last
        upload touched. A bad chunk (or a broken stream) raises, keeping every chunk before it."""
        records: dict[str, UploadRecord] = {}
        handles: dict[tuple[str, str], _OpenFile] = {}
        last: str | None = None
        try:
            for chunk in chunks:
                record = records.get(chunk.upload_id)
                if record is None:
                    record = records[chunk.upload_id] = _owned(self._store, site, chunk.upload_id)
                if record.state != "open":
                    raise FailedPrecondition(f"upload {record.upload_id} is already {record.state}")
                last = chunk.upload_id
                self._write_chunk(record, chunk, handles)
        finally:
            for key, handle in handles.items():
                try:
                    self._settle(key, handle)
                finally:
                    os.close(handle.fd)
                    self._release(key)
        if last is None:
            return {}
        current = self._store.get_upload(last)
        return dict(current.received) if current else {}

    def _settle(self, key: tuple[str, str], handle: _OpenFile) -> None:
        """Waits for the hash of the last chunk and records progress in the store."""
        if handle.hashing is not None:
            handle.hashing.result()
            handle.hashing = None
        if handle.received > handle.persisted:
            self._store.advance_upload(
                key[0], key[1], handle.persisted, handle.received - handle.persisted
            )
            handle.persisted = handle.received
        if handle.hasher is not None and handle.received == handle.size:
            with self._lock:
                self._digests[key] = handle.hasher.hexdigest()

    def _write_chunk(
        self, record: UploadRecord, chunk: UploadChunk, handles: dict[tuple[str, str], _OpenFile]
    ) -> None:
        declared = {f.path: f for f in record.files}
        if chunk.path not in declared:
            raise NotFound(f"upload {record.upload_id}: {chunk.path!r} is not in its file list")
        if len(chunk.data) > MAX_CHUNK:
            raise InvalidArgument(f"chunk of {len(chunk.data)} bytes: at most {MAX_CHUNK}")
        key = (record.upload_id, chunk.path)
        handle = handles.get(key)
        if handle is None:
            self._claim(key)
            try:
                # Read after the claim: no other stream moves it from here on.
                current = self._store.get_upload(record.upload_id)
                received = current.received[chunk.path] if current else 0
                target = upload_files_dir(self._state, record.upload_id) / chunk.path
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
            except BaseException:
                self._release(key)
                raise
            hasher = hashlib.sha256() if received == 0 else None
            size = declared[chunk.path].size
            handle = handles[key] = _OpenFile(fd, size, received, received, hasher)
        # Checked before writing, so a bad chunk never overwrites bytes already received.
        if chunk.offset != handle.received:
            raise InvalidArgument(
                f"upload {record.upload_id}: chunk of {chunk.path!r} at offset "
                f"{chunk.offset}, expected offset {handle.received}"
            )
        if chunk.offset + len(chunk.data) > handle.size:
            raise InvalidArgument(
                f"upload {record.upload_id}: chunk would grow {chunk.path!r} to "
                f"{chunk.offset + len(chunk.data)} bytes, past its declared size {handle.size}"
            )
        self.write_at(handle.fd, chunk.data, chunk.offset)
        handle.received += len(chunk.data)
        if handle.hasher is not None:
            if handle.hashing is not None:
                handle.hashing.result()  # in order, and at most one chunk held for hashing
            handle.hashing = self._hashers.submit(handle.hasher.update, chunk.data)
        if handle.received - handle.persisted >= PERSIST_EVERY or handle.received == handle.size:
            self._settle(key, handle)

    def streamed_digest(self, upload_id: str, path: str) -> str | None:
        """The sha256 computed while receiving, when the file arrived in one stream."""
        with self._lock:
            return self._digests.get((upload_id, path))

    def forget(self, upload_id: str) -> None:
        with self._lock:
            for key in [k for k in self._digests if k[0] == upload_id]:
                del self._digests[key]


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
    record = _owned(store, site, upload_id)
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
        return _finished_result(_owned(store, site, upload_id), auditor)
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
