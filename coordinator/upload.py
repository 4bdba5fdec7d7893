"""Upload sessions: begin (manifest of files), chunks written straight to disk, commit.

Files land in ``STATE/uploads/<id>/files/<path>``, each written with ``pwrite`` at the offset
the store says was received, so memory stays flat whatever the file size and an interrupted
upload resumes exactly where the coordinator's record says it stopped.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from coordinator import audit
from coordinator.state import StateDir
from coordinator.store import SiteRecord, Store, UploadRecord
from protocol.digests import check_sha256_hex, file_sha256
from protocol.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from protocol.messages import CommitResult, UploadChunk, UploadFile, UploadStatus

MAX_FILES = 10_000
MAX_CHUNK = 8 << 20

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
) -> UploadStatus:
    """Opens a session for the site's own expert, or resumes the open one for these files."""
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
        if item.path in seen:
            raise InvalidArgument(f"BeginUploadRequest.files: {item.path!r} listed twice")
        seen.add(item.path)
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
        self._file_locks: dict[tuple[str, str], threading.Lock] = {}
        self._digests: dict[tuple[str, str], str] = {}
        # hashlib releases the GIL: hashing one chunk overlaps receiving the next.
        self._hashers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="upload-hash")

    def _file_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._lock:
            return self._file_locks.setdefault(key, threading.Lock())

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
        with self._file_lock(key):
            handle = handles.get(key)
            if handle is None:
                current = self._store.get_upload(record.upload_id)
                received = current.received[chunk.path] if current else 0
                target = upload_files_dir(self._state, record.upload_id) / chunk.path
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
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
            os.pwrite(handle.fd, chunk.data, chunk.offset)
            handle.received += len(chunk.data)
            if handle.hasher is not None:
                if handle.hashing is not None:
                    handle.hashing.result()  # in order, and at most one chunk held for hashing
                handle.hashing = self._hashers.submit(handle.hasher.update, chunk.data)
            if (
                handle.received - handle.persisted >= PERSIST_EVERY
                or handle.received == handle.size
            ):
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
            return CommitResult(False, reason)
        provenance = audit.provenance_details(root, site)
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
    return CommitResult(True, "", auditor.upload_receipt(finished))


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
