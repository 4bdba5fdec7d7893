"""The shard images the coordinator serves to a site that has no copy of them.

``coordinator partition`` records where the images are (:func:`record_images`): the image
root, whether images are served at all (``--no-serve-images``: every site brings its own copy)
and an index of every image the shards list, ``sha256 -> (path as the shard writes it, size,
expert)``. A site asks for ``images/<sha256>`` through ``DownloadArtifact`` (same resumable
stream as any artifact); :func:`open_image` answers only the site assigned the expert whose
shard lists that image, and streams the file from the image root in place, one chunk in
memory at a time.

A file that changed since the partition is refused: its size is compared before anything is
sent, and its sha256 is computed as it streams, with the last chunk held back until the digest
matches, so a site never receives a whole wrong image. The operator's log names the file.

The index is ``STATE/images.db``, a SQLite file derived from the plan's shard manifests and
replaced whole (write, then rename) each time ``partition`` runs, so it needs no migrations and
a reader never sees half of one; lookups use the primary key, so memory stays flat whatever
the number of images.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from coordinator.artifacts import CHUNK_SIZE
from coordinator.partition.dataset import resolve_image
from coordinator.state import StateDir
from coordinator.store import SiteRecord, Store
from protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    VerificationFailed,
)
from protocol.messages import ArtifactRef
from protocol.shard_manifest import (
    IMAGE_PREFIX,
    image_artifact_name,
    load_shard_manifest,
    shard_artifact_name,
    shard_images,
)

__all__ = [
    "ImageIndexSummary",
    "is_image_name",
    "open_image",
    "record_images",
]

log = logging.getLogger("atoll.coordinator")
NOT_SERVED = (
    "this federation's coordinator does not serve images (it was partitioned with "
    "`coordinator partition --no-serve-images`): every site brings its own copy of its "
    "shard's images; pass --image-root DIR"
)
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    expert INTEGER NOT NULL,
    PRIMARY KEY (sha256, expert)
) WITHOUT ROWID;
"""


def is_image_name(name: str) -> bool:
    return name.startswith(IMAGE_PREFIX)


@dataclass(frozen=True)
class ImageIndexSummary:
    """What :func:`record_images` recorded: the root, whether images are served, and how
    many distinct images (per expert) of how many bytes in all."""

    image_root: Path
    served: bool
    images: int
    bytes: int


def record_images(
    state: StateDir,
    store: Store,
    image_root: Path,
    serve: bool = True,
    progress: Callable[[int], None] | None = None,
) -> ImageIndexSummary:
    """Indexes the images of every shard the plan registered, to be served from ``image_root``.

    Args:
        state: The coordinator's state directory (the index goes to ``STATE/images.db``).
        store: Its store: the plan and the ``partition/expert-<k>.json`` artifacts.
        image_root: The folder the shards' relative image paths start from.
        serve: False records that sites must bring their own copy (nothing is indexed).
        progress: Called with 1 per image indexed.

    Raises:
        FailedPrecondition: no partition plan yet.
        NotFound: an image the plan lists is not under ``image_root``.
    """
    plan = store.get_plan()
    if plan is None:
        raise FailedPrecondition("no partition plan yet: run `coordinator partition` first")
    root = image_root.resolve()
    shards = sorted(
        (artifact.expert, state.root / artifact.path)
        for artifact in store.list_artifacts()
        if artifact.expert is not None and artifact.name == shard_artifact_name(artifact.expert)
    )
    final = state.images_index
    temporary = final.with_name(f".images-{uuid.uuid4().hex[:8]}.db")
    try:
        with closing(sqlite3.connect(temporary)) as conn, conn:
            conn.executescript(_SCHEMA)
            meta = {
                "image_root": str(root),
                "served": "1" if serve else "0",
                "plan_digest": plan.digest,
                "recorded_at": str(time.time()),
            }
            conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            for expert, shard in shards if serve else []:
                # One shard in memory at a time; the same picture under two paths of a shard
                # is one row (either path serves it).
                rows = _shard_rows(shard, root, expert, progress)
                conn.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)", rows)
            count, size = conn.execute("SELECT count(*), total(size) FROM images").fetchone()
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return ImageIndexSummary(root, serve, int(count), int(size))


def _shard_rows(
    shard: Path, root: Path, expert: int, progress: Callable[[int], None] | None
) -> list[tuple[str, str, int, int]]:
    rows = []
    for relative, (digest, where) in sorted(shard_images(load_shard_manifest(shard)).items()):
        try:
            size = resolve_image(root, relative).stat().st_size
        except OSError as error:
            raise NotFound(
                f"{where}: image {relative!r} is not readable under {root} "
                f"({error.strerror}); pass the --image-root the data set was hashed from"
            ) from None
        rows.append((digest, relative, size, expert))
        if progress is not None:
            progress(1)
    return rows


@dataclass(frozen=True)
class _Image:
    sha256: str
    path: Path  # where it is on the coordinator's disk
    relative: str  # as the shard writes it (what the site knows it by)
    size: int


def _authorize(state: StateDir, store: Store, site: SiteRecord, sha256: str) -> _Image:
    final = state.images_index
    if not final.exists():
        raise FailedPrecondition(
            "this coordinator has recorded no image root: run `coordinator partition` again "
            "(it records where images are served from), or pass --image-root DIR at the site"
        )
    with closing(sqlite3.connect(f"file:{final}?mode=ro", uri=True)) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        found = conn.execute(
            "SELECT path, size, expert FROM images WHERE sha256 = ?", (sha256,)
        ).fetchall()
    if meta["served"] != "1":
        raise FailedPrecondition(NOT_SERVED)
    plan = store.get_plan()
    if plan is None or plan.digest != meta["plan_digest"]:
        raise FailedPrecondition(
            "the coordinator's image index is of another partition plan: its operator must "
            "run `coordinator partition` again"
        )
    if not found:
        raise NotFound(f"no image with sha256 {sha256} in this federation's partition")
    assignment = store.get_assignment(site.name)
    if assignment is None:
        raise PermissionDenied(f"site {site.name!r} holds no expert slot: it may fetch no image")
    for relative, size, expert in found:
        if expert == assignment.expert_index:
            path = resolve_image(Path(meta["image_root"]), relative)
            return _Image(sha256, path, relative, size)
    raise PermissionDenied(
        f"image {sha256[:16]}.. is not in the shard of expert {assignment.expert_index}, "
        f"the one assigned to site {site.name!r}"
    )


def _changed(image: _Image, now: str) -> VerificationFailed:
    log.error(
        "[Images] %s changed since the partition: expected sha256 %s (%d bytes), %s; sites "
        "cannot fetch it until it is restored (or the data is partitioned again)",
        image.path,
        image.sha256,
        image.size,
        now,
    )
    return VerificationFailed(
        f"image {image.relative!r} (sha256 {image.sha256[:16]}..) changed on the coordinator's "
        "disk since the partition: the coordinator refuses to serve it; ask its operator to "
        "restore the file"
    )


def _stream(image: _Image, offset: int, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    digest = hashlib.sha256()
    held: tuple[int, bytes] | None = None
    position = 0
    try:
        handle = image.path.open("rb")
    except OSError as error:
        raise _changed(image, f"now unreadable ({error.strerror})") from None
    with handle:
        while data := handle.read(chunk_size):
            digest.update(data)
            end = position + len(data)
            if end > offset:
                if held is not None:
                    yield held
                start = max(offset, position)
                held = (start, data[start - position :])
            position = end
    actual = digest.hexdigest()
    if position != image.size or actual != image.sha256:
        raise _changed(image, f"found sha256 {actual} ({position} bytes)")
    if held is not None:
        yield held


def open_image(
    state: StateDir,
    store: Store,
    site: SiteRecord,
    name: str,
    offset: int,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[ArtifactRef, Iterator[tuple[int, bytes]]]:
    """The image ``images/<sha256>`` for ``site``, streamed from ``offset``.

    Raises:
        InvalidArgument: not a sha256, or an offset past the image's end.
        FailedPrecondition: the federation does not serve images, or recorded no image root.
        NotFound: no shard lists this digest.
        PermissionDenied: the image is in another expert's shard (or the site holds none).
        VerificationFailed: the file changed since the partition (also while streaming).
    """
    sha256 = name.removeprefix(IMAGE_PREFIX)
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InvalidArgument(
            f"artifact name {name!r}: expected images/<sha256> (64 lowercase hex digits)"
        )
    image = _authorize(state, store, site, sha256)
    if offset > image.size:
        raise InvalidArgument(
            f"image {sha256[:16]}..: offset {offset} is past its size {image.size}"
        )
    try:
        size = image.path.stat().st_size
    except OSError as error:
        raise _changed(image, f"now unreadable ({error.strerror})") from None
    if size != image.size:
        raise _changed(image, f"now {size} bytes")
    return ArtifactRef(image_artifact_name(sha256), image.size, sha256), _stream(
        image, offset, chunk_size
    )
