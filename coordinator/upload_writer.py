"""Receiving an upload's chunk streams: each chunk written straight to disk with ``pwrite``
at the offset the store says was received, hashed while it streams.

Files land in ``STATE/uploads/<id>/files/<path>``, so memory stays flat whatever the file size
and an interrupted upload resumes exactly where the coordinator's record says it stopped. One
stream at a time writes a file (a second is refused with ABORTED, which sites retry), so a
digest computed while a stream wrote the whole file is the digest of what is on disk
(:meth:`UploadWriter.streamed_digest`); commit (:mod:`coordinator.upload`) hashes any other.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from coordinator.state import StateDir
from coordinator.store import SiteRecord, Store, UploadRecord
from protocol.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from protocol.messages import UploadChunk

MAX_CHUNK = 8 << 20


def upload_files_dir(state: StateDir, upload_id: str) -> Path:
    return state.uploads_dir / upload_id / "files"


def owned_upload(store: Store, site: SiteRecord, upload_id: str) -> UploadRecord:
    """The site's own upload session ``upload_id``; any other is NotFound."""
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
                    record = records[chunk.upload_id] = owned_upload(
                        self._store, site, chunk.upload_id
                    )
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
