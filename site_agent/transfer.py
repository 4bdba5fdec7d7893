"""Resumable, verified expert uploads (downloads live in ``protocol.download``).

An upload survives a dropped connection or a coordinator restart: it resumes from what the
coordinator says it received (BeginUpload).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from protocol.client import FederationClient
from protocol.digests import hash_folder
from protocol.errors import VerificationFailed
from protocol.messages import CommitResult, UploadChunk, UploadFile, UploadStatus
from protocol.progress import Advance, progress_bars
from protocol.signing import SIGNATURE_FILE, read_signed_digests

log = logging.getLogger("atoll.site")
CHUNK_SIZE = 1 << 20


def directory_manifest(directory: Path, known: Mapping[str, str] | None = None) -> list[UploadFile]:
    """Every regular file under ``directory`` with its size and sha256, sorted by path.

    ``known`` digests (e.g. those the site's own ``model.sig`` just signed) are not computed
    again; should a file have changed since, the coordinator's digest check rejects it.
    """
    files = hash_folder(directory, known=known)
    return [UploadFile(name, digest.size, digest.sha256) for name, digest in files.items()]


def signed_manifest(directory: Path) -> list[UploadFile]:
    """The upload manifest of a signed expert, reusing the digests its ``model.sig`` holds."""
    signature = directory / SIGNATURE_FILE
    known = read_signed_digests(signature.read_bytes()).files if signature.exists() else {}
    return directory_manifest(directory, known)


def _chunks(
    directory: Path,
    upload_id: str,
    files: list[UploadFile],
    received: dict[str, int],
    advance: Advance,
) -> Iterator[UploadChunk]:
    for item in files:
        offset = received.get(item.path, 0)
        if offset >= item.size:
            continue
        with (directory / item.path).open("rb") as handle:
            handle.seek(offset)
            while offset < item.size:
                data = handle.read(min(CHUNK_SIZE, item.size - offset))
                if not data:
                    raise VerificationFailed(f"{item.path} shrank while uploading")
                yield UploadChunk(upload_id, item.path, offset, data)
                offset += len(data)
                advance(len(data))


def upload_directory(
    client: FederationClient,
    expert_index: int,
    directory: Path,
    progress: bool = False,
    files: list[UploadFile] | None = None,
) -> CommitResult:
    """Uploads every file of ``directory`` for ``expert_index`` and commits the session."""
    manifest = directory_manifest(directory) if files is None else files
    total = sum(f.size for f in manifest)

    def attempt() -> UploadStatus:
        # Each attempt resumes from what the coordinator says it received.
        status = client.begin_upload(expert_index, manifest)
        if status.state == "open":
            done = sum(min(status.received.get(f.path, 0), f.size) for f in manifest)
            with progress_bars(progress) as bars:
                advance = bars.add(
                    f"upload expert-{expert_index}", total, unit="bytes", completed=done
                )
                client.upload_chunks(
                    _chunks(directory, status.upload_id, manifest, status.received, advance)
                )
        return status

    status = client.retry.run(f"upload of expert {expert_index}", attempt)
    result = client.commit_upload(status.upload_id)
    if not result.accepted:
        log.warning("[site] upload %s not accepted: %s", status.upload_id, result.reason)
    return result
