"""The shard's images at a site: use the site's own copy, fetch what it lacks.

A site that brings its own copy of the data set (``--image-root``) trains from it as it is.
One with no copy, or a partial one, gets a complete image root under its workdir, in the
layout the shard manifest expects (``WORKDIR/images/<path as the shard writes it>``):

* images its own copy has are checked against the shard's sha256 and linked, not copied (a
  file that differs is reported, never replaced: it is the site's data);
* the rest are downloaded from the coordinator, ``images/<sha256>`` each, resumable and
  verified on arrival, a few at a time; an image listed under two paths comes once.

The coordinator serves only the images of the shard this site is assigned; a federation
partitioned with ``--no-serve-images`` expects every site to bring its own copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from rich.filesize import decimal

from protocol.client import FederationClient
from protocol.digests import file_sha256
from protocol.download import download_to
from protocol.errors import FailedPrecondition, NotFound, VerificationFailed
from protocol.progress import progress_bars
from protocol.shard_manifest import (
    image_artifact_name,
    image_path,
    load_shard_manifest,
    shard_images,
)

__all__ = ["FETCH_WORKERS", "ImagesReady", "prepare_images"]

log = logging.getLogger("atoll.site")
# Concurrent image streams: they hide part of the round trip of many small files; the
# coordinator's per-site cap (coordinator.call_limits) counts them with a heartbeat, an upload
# and resumed calls.
FETCH_WORKERS = 3
_LISTED = 3


@dataclass(frozen=True)
class ImagesReady:
    """Where the trainer finds the shard's images, and how they got there.

    Attributes:
        root: The image root to train from (None: the shard has no images).
        images: Distinct image paths the shard lists.
        local: Those found in the site's own copy (checked and linked into ``root``).
        fetched: Images downloaded from the coordinator now.
        received: Bytes those downloads received over the wire.
        complete: False when stopped before every image arrived.
    """

    root: Path | None
    images: int = 0
    local: int = 0
    fetched: int = 0
    received: int = 0
    complete: bool = True


@dataclass(frozen=True)
class _Wanted:
    relative: str
    sha256: str
    where: str  # the first sample naming it, for errors
    dest: Path  # under the workdir's image root


def _listed(items: list[str]) -> str:
    more = len(items) - _LISTED
    return ", ".join(items[:_LISTED]) + (f" and {more} more" if more > 0 else "")


def prepare_images(
    shard: Path,
    images_dir: Path,
    image_root: Path | None,
    client: FederationClient | None,
    *,
    progress: bool = False,
    stop: threading.Event | None = None,
    tick: Callable[[str], None] | None = None,
    workers: int = FETCH_WORKERS,
) -> ImagesReady:
    """Makes every image of ``shard`` available and returns the root to train from.

    Args:
        shard: The verified shard manifest (``expert-<k>.json``).
        images_dir: The workdir's image root, completed here when ``image_root`` lacks images.
        image_root: The site's own copy, if any.
        client: The coordinator to fetch from (None: an offline site, which cannot).
        progress: Show a progress bar.
        stop: Set to stop between images (the result is then not ``complete``).
        tick: Called about once a second while images download, with a progress message.
        workers: Concurrent downloads.

    Raises:
        NotFound: ``image_root`` is not a directory.
        VerificationFailed: files of the site's copy differ from the shard's digests, or a
            downloaded image does not verify.
        FailedPrecondition: images are missing and the site is offline, or the coordinator
            does not serve images.
        PermissionDenied, NotFound: the coordinator's answer for an image.
    """
    wanted_by_path = shard_images(load_shard_manifest(shard))
    if not wanted_by_path:
        return ImagesReady(image_root)
    if image_root is not None and not image_root.is_dir():
        raise NotFound(f"--image-root {image_root}: no such directory")
    wanted = [
        _Wanted(relative, digest, where, image_path(images_dir, relative, where))
        for relative, (digest, where) in sorted(wanted_by_path.items())
    ]
    count = len(wanted)
    if image_root is not None and all(
        image_path(image_root, w.relative, w.where).is_file() for w in wanted
    ):
        # A complete copy is used as it is; the trainer checks every digest before it starts.
        return ImagesReady(image_root, count, count)
    todo = [w for w in wanted if not w.dest.is_file()]  # earlier arrivals were verified then
    local = _link_own_copy(todo, image_root) if image_root is not None else {}
    missing = [w for w in todo if w.relative not in local]
    linked = count - len(todo) + len(local)
    if not missing:
        return ImagesReady(images_dir, count, linked)
    where = f" under {image_root}" if image_root is not None else ""
    lacking = f"{len(missing)} of the shard's {count} images are missing{where}"
    if client is None:
        raise FailedPrecondition(
            f"{lacking} ({_listed([repr(w.relative) for w in missing])}): run `site-agent "
            "join` to fetch them from the coordinator, or pass --image-root DIR with them"
        )
    log.info("[site] %s: fetching them from the coordinator", lacking)
    try:
        fetched, received, complete = _fetch(client, missing, progress, stop, tick, workers)
    except FailedPrecondition as error:
        raise FailedPrecondition(f"{error} ({lacking})") from None
    log.info(
        "[site] images ready in %s: %d linked from the site's copy, %d fetched (%s)",
        images_dir,
        linked,
        fetched,
        decimal(received),
    )
    return ImagesReady(images_dir, count, linked, fetched, received, complete)


def _link_own_copy(todo: list[_Wanted], image_root: Path) -> dict[str, Path]:
    """Links the files of the site's copy into the workdir's root, once each matches its
    digest; returns ``{relative path: source}`` of those linked."""
    candidates = [
        (w, source)
        for w in todo
        if (source := image_path(image_root, w.relative, w.where)).is_file()
    ]
    # sha256 releases the GIL, so threads read and hash several files at once.
    with ThreadPoolExecutor(max_workers=8) as pool:
        actual = list(pool.map(lambda item: file_sha256(item[1]), candidates))
    wrong = [
        f"{w.relative!r} (expected sha256 {w.sha256[:16]}.., got {digest[:16]}..)"
        for (w, _), digest in zip(candidates, actual, strict=True)
        if digest != w.sha256
    ]
    if wrong:
        raise VerificationFailed(
            f"{len(wrong)} image(s) under --image-root {image_root} differ from the federation's: "
            f"{_listed(wrong)}; they are left as they are: fix or remove them (the agent then "
            "fetches the federation's copy)"
        )
    linked: dict[str, Path] = {}
    for w, source in candidates:
        w.dest.parent.mkdir(parents=True, exist_ok=True)
        w.dest.unlink(missing_ok=True)  # a link to where the copy used to be
        w.dest.symlink_to(source.resolve())
        linked[w.relative] = source
    return linked


def _fetch(
    client: FederationClient,
    missing: list[_Wanted],
    progress: bool,
    stop: threading.Event | None,
    tick: Callable[[str], None] | None,
    workers: int,
) -> tuple[int, int, bool]:
    """Downloads each missing digest once; returns (images fetched, bytes, complete)."""
    by_digest: dict[str, list[_Wanted]] = {}
    for w in missing:
        by_digest.setdefault(w.sha256, []).append(w)
    received = [0]
    lock = threading.Lock()
    with progress_bars(progress) as bars:
        fetched = bars.add("fetching images", len(by_digest))
        received_bytes = bars.add("received", unit="bytes")

        def count(n: int) -> None:
            with lock:
                received[0] += n
            received_bytes(n)

        def fetch(copies: list[_Wanted]) -> bool:
            if stop is not None and stop.is_set():
                return False
            first = copies[0]
            download_to(
                client, image_artifact_name(first.sha256), first.sha256, first.dest, on_bytes=count
            )
            for other in copies[1:]:
                _duplicate(first.dest, other.dest)
            fetched(1)
            return True

        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: set[Future[bool]] = {pool.submit(fetch, c) for c in by_digest.values()}
            done_count = 0
            try:
                while pending:
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
                    for future in done:
                        done_count += future.result()  # raises the first failure
                    if tick is not None:
                        tick(f"images {done_count}/{len(by_digest)} fetched")
            finally:
                for future in pending:
                    future.cancel()
    return done_count, received[0], done_count == len(by_digest)


def _duplicate(source: Path, dest: Path) -> None:
    """The same picture under a second path: a hard link, or a copy across file systems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
