"""Online backup and restore of a coordinator's state directory.

``coordinator backup --state DIR --out FILE`` runs beside a serving coordinator. It takes
the store with SQLite's online backup API (one consistent snapshot, while the server keeps
writing), *then* copies every other file: the CA and signing keys, the serving certificate,
artifacts, the partition plan, assembled ensembles and upload sessions. Because upload
chunks reach the disk before the store records them, each file copied after the snapshot
holds at least the bytes the snapshot says were received; restore cuts them back to exactly
that, so a site resumes its upload from the snapshot's offsets.

The file is a tar archive whose last entry, ``MANIFEST.json``, lists every other entry with
its size and sha256 (and the format, federation and time). Restore checks each entry against
it as it unpacks and names the first one that is missing, extra, truncated or altered.

**Secrets.** The archive holds the federation CA's key and the coordinator's signing key: with
them anyone can issue site certificates and sign audit checkpoints. The file is created
readable by its owner only (0600, never overwriting an existing file). With
``--passphrase-file`` the three private keys inside are encrypted (PKCS#8,
``BestAvailableEncryption``: scrypt + AES-256-CBC via ``cryptography``), and restore needs
the same passphrase; keep the passphrase apart from the backups. The manifest's digests
detect corruption and edits, not a forger who rewrites the manifest as well: keep backups
where only the operator can write.

Restore (``coordinator restore --from FILE --state NEWDIR``) refuses a non-empty directory,
unpacks into a temporary sibling, checks every digest, verifies the audit log against its
signed checkpoints with the restored signing key, and only then moves it into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import serialization

from coordinator import audit_report
from coordinator.state import StateDir, open_store
from protocol.errors import AlreadyExists, FailedPrecondition, InvalidArgument, VerificationFailed
from protocol.identity import coordinator_spiffe_id
from protocol.x509 import load_private_key, private_key_pem

FORMAT = "atoll.backup/v1"
MANIFEST = "MANIFEST.json"
STORE_ENTRY = "store.db"
# Relative to the state directory; encrypted inside the archive when a passphrase is given.
SECRET_FILES = ("ca/ca.key", "signing/signing.key", "tls/server.key")
# Never archived: the live database (its snapshot is STORE_ENTRY) and half-written files.
_SKIPPED_NAMES = {"store.db", "store.db-wal", "store.db-shm", "store.db-journal"}
_CHUNK = 1 << 20

__all__ = ["BackupResult", "backup", "restore"]


@dataclass(frozen=True)
class BackupResult:
    path: Path
    entries: int
    bytes: int
    audit_events: int
    open_uploads: int
    encrypted_keys: bool


def _files(root: Path) -> Iterator[Path]:
    """Every regular file to archive, in a stable order."""
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".init-"))
        for name in sorted(names):
            if Path(directory) == root and name in _SKIPPED_NAMES:
                continue
            if name.endswith(".tmp"):
                continue
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                yield path


class _HashingReader(io.RawIOBase):
    """Reads the first ``size`` bytes of a file (which may still grow) and hashes them."""

    def __init__(self, handle: IO[bytes], size: int) -> None:
        self.handle, self.left, self.sha = handle, size, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.handle.read(n)
        if len(data) < n:
            raise FailedPrecondition(f"{self.handle.name}: shrank while being archived")
        self.left -= len(data)
        self.sha.update(data)
        return data


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> dict[str, Any]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _snapshot_store(state: StateDir, into: Path) -> None:
    """SQLite's online backup: a consistent copy while the server keeps writing."""
    source = sqlite3.connect(f"file:{state.store_path}?mode=ro", uri=True, timeout=30.0)
    target = sqlite3.connect(into)
    try:
        source.backup(target, pages=4096)
    finally:
        target.close()
        source.close()


def backup(
    state: StateDir,
    out: Path,
    passphrase: bytes | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> BackupResult:
    """Writes a consistent backup of ``state`` to ``out`` (see the module docstring)."""
    federation = state.federation()
    if passphrase is not None and len(passphrase) < 12:
        raise InvalidArgument("--passphrase-file: expected a passphrase of at least 12 bytes")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as error:
        raise AlreadyExists(f"--out {out}: exists; refusing to overwrite a backup") from error
    entries: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="atoll-backup-") as scratch:
            snapshot = Path(scratch) / STORE_ENTRY
            _snapshot_store(state, snapshot)
            store = open_store(f"sqlite:///{snapshot}")
            try:
                open_uploads = {u.upload_id: u for u in store.list_uploads("open")}
                events = store.audit_size()
            finally:
                store.close()
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
                info = tarfile.TarInfo(STORE_ENTRY)
                info.size, info.mode = snapshot.stat().st_size, 0o600
                with snapshot.open("rb") as handle:
                    reader = _HashingReader(handle, info.size)
                    tar.addfile(info, reader)
                entries[STORE_ENTRY] = {"size": info.size, "sha256": reader.sha.hexdigest()}
                for path in _files(state.root):
                    name = path.relative_to(state.root).as_posix()
                    if name in SECRET_FILES:
                        data = _secret_bytes(path, passphrase)
                        entries[name] = {**_add_bytes(tar, name, data, 0o600)}
                        entries[name]["encrypted"] = passphrase is not None
                        continue
                    try:
                        handle = path.open("rb")
                    except FileNotFoundError:
                        continue  # removed meanwhile (e.g. a replaced artifact)
                    with handle:
                        # fstat: the path may be deleted meanwhile (a pruned upload session).
                        stat = os.fstat(handle.fileno())
                        if progress is not None:
                            progress(name, stat.st_size)
                        info = tarfile.TarInfo(name)
                        info.size, info.mode = stat.st_size, stat.st_mode & 0o777
                        info.mtime = int(stat.st_mtime)
                        reader = _HashingReader(handle, stat.st_size)
                        tar.addfile(info, reader)
                    entries[name] = {"size": stat.st_size, "sha256": reader.sha.hexdigest()}
                manifest = {
                    "format": FORMAT,
                    "federation": federation,
                    "created_at": time.time(),
                    "audit_events": events,
                    "open_uploads": {
                        upload_id: dict(record.received)
                        for upload_id, record in open_uploads.items()
                    },
                    "entries": entries,
                }
                data = json.dumps(manifest, indent=2, sort_keys=True).encode()
                _add_bytes(tar, MANIFEST, data, 0o644)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return BackupResult(
        path=out,
        entries=len(entries),
        bytes=sum(int(e["size"]) for e in entries.values()),
        audit_events=events,
        open_uploads=len(open_uploads),
        encrypted_keys=passphrase is not None,
    )


def _secret_bytes(path: Path, passphrase: bytes | None) -> bytes:
    if passphrase is None:
        return path.read_bytes()
    key = load_private_key(path)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


# -- restore ------------------------------------------------------------------------------


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AlreadyExists(
            f"--state {target}: not empty; restore only into a new or empty directory "
            "(a restore never mixes with another federation's files)"
        )


def _safe_name(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise VerificationFailed(f"backup entry {name!r}: not a relative path inside the state")
    return name


def restore(source: Path, target: Path, passphrase: bytes | None = None) -> dict[str, Any]:
    """Restores the backup ``source`` into the new directory ``target``; returns its manifest.

    Raises:
        AlreadyExists: ``target`` holds files.
        VerificationFailed: An entry is missing, extra, truncated or altered (named), or the
            restored audit log does not verify.
    """
    _check_target(target)
    if not source.is_file():
        raise InvalidArgument(f"--from {source}: no such backup file")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    try:
        manifest = _unpack(source, staging)
        _decrypt_secrets(staging, manifest, passphrase)
        _cut_open_uploads(StateDir(staging), manifest)
        _verify_audit(StateDir(staging))
        _check_target(target)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _unpack(source: Path, staging: Path) -> dict[str, Any]:
    seen: dict[str, dict[str, Any]] = {}
    manifest: dict[str, Any] | None = None
    current = "(the archive header)"
    try:
        with tarfile.open(source, mode="r|") as tar:
            for member in tar:
                current = member.name
                if not member.isfile():
                    raise VerificationFailed(f"backup entry {member.name!r}: not a regular file")
                handle = tar.extractfile(member)
                assert handle is not None
                if member.name == MANIFEST:
                    manifest = json.loads(handle.read())
                    continue
                name = _safe_name(member.name)
                if manifest is not None:
                    raise VerificationFailed(f"backup entry {name!r}: after {MANIFEST}")
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                sha = hashlib.sha256()
                size = 0
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, member.mode & 0o777)
                with os.fdopen(fd, "wb") as out:
                    while chunk := handle.read(_CHUNK):
                        sha.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                seen[name] = {"size": size, "sha256": sha.hexdigest()}
    except (tarfile.TarError, EOFError, OSError) as error:
        raise VerificationFailed(
            f"backup {source}: unreadable at entry {current!r} ({error}): truncated or damaged"
        ) from error
    except ValueError as error:
        raise VerificationFailed(f"backup {source}: {MANIFEST} is not JSON ({error})") from error
    if manifest is None:
        last = next(reversed(seen), "(none)") if seen else "(none)"
        raise VerificationFailed(
            f"backup {source}: no {MANIFEST} (the archive ends after entry {last!r}): truncated"
        )
    if manifest.get("format") != FORMAT:
        raise VerificationFailed(
            f"backup {source}: format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    expected: dict[str, dict[str, Any]] = manifest["entries"]
    for name, entry in expected.items():
        got = seen.get(name)
        if got is None:
            raise VerificationFailed(f"backup entry {name!r}: listed in {MANIFEST}, missing")
        if got["size"] != entry["size"]:
            raise VerificationFailed(
                f"backup entry {name!r}: expected {entry['size']} bytes, got {got['size']}"
            )
        if got["sha256"] != entry["sha256"]:
            raise VerificationFailed(
                f"backup entry {name!r}: expected sha256 {entry['sha256'][:16]}.., got "
                f"{got['sha256'][:16]}.. (altered)"
            )
    extra = sorted(set(seen) - set(expected))
    if extra:
        raise VerificationFailed(f"backup entry {extra[0]!r}: not listed in {MANIFEST}")
    return manifest


def _decrypt_secrets(staging: Path, manifest: dict[str, Any], passphrase: bytes | None) -> None:
    for name in SECRET_FILES:
        entry = manifest["entries"].get(name)
        if entry is None or not entry.get("encrypted"):
            continue
        if passphrase is None:
            raise InvalidArgument(
                f"backup entry {name!r} is encrypted: pass --passphrase-file with the backup's "
                "passphrase"
            )
        path = staging / name
        try:
            key = load_private_key(path, password=passphrase)
        except InvalidArgument as error:
            raise VerificationFailed(
                f"backup entry {name!r}: cannot decrypt with this passphrase ({error})"
            ) from error
        data = private_key_pem(key)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)


def _cut_open_uploads(state: StateDir, manifest: dict[str, Any]) -> None:
    """Each open upload's files back to what the snapshot says was received."""
    for upload_id, received in manifest.get("open_uploads", {}).items():
        files = state.uploads_dir / upload_id / "files"
        for path, count in received.items():
            target = files / _safe_name(path)
            if not target.exists():
                if count:
                    raise VerificationFailed(
                        f"backup: upload {upload_id} file {path!r}: the store records {count} "
                        "bytes received, the archive has no file"
                    )
                continue
            if target.stat().st_size < count:
                raise VerificationFailed(
                    f"backup: upload {upload_id} file {path!r}: the store records {count} bytes "
                    f"received, the archive holds {target.stat().st_size}"
                )
            os.truncate(target, count)


def _verify_audit(state: StateDir) -> None:
    store = state.open_store()
    try:
        key = load_private_key(state.signing_key)
        report = audit_report.verify_store_log(
            store, coordinator_spiffe_id(state.federation()), key.public_key()
        )
    finally:
        store.close()
    if not report.verified:
        raise VerificationFailed(f"restored audit log does not verify: {report.error}")
