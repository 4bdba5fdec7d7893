"""Resumable, verified artifact downloads (sites fetch shards and bases; readers fetch the
published ensemble; sites with no copy of their shard's images fetch those, one
``images/<sha256>`` each). A download resumes from the size of its ``.part`` file after a
dropped connection or a coordinator restart, and a file is renamed into place only once its
sha256 matches."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from protocol.client import FederationClient
from protocol.digests import file_sha256
from protocol.errors import InvalidArgument, Unavailable, VerificationFailed
from protocol.messages import ArtifactRef
from protocol.progress import progress_bars

log = logging.getLogger("atoll.download")


def partial_path(target: Path) -> Path:
    """Where the bytes of ``target`` collect until they are verified."""
    return target.with_name(target.name + ".part")


def download_to(
    client: FederationClient,
    name: str,
    sha256: str,
    target: Path,
    *,
    size: int | None = None,
    on_bytes: Callable[[int], object] | None = None,
) -> int:
    """Downloads ``name`` to ``target`` through its ``.part`` file, resuming after a dropped
    connection (``client.retry``), and renames it into place once its sha256 (and ``size``,
    when known) match.

    A resumed download whose bytes do not verify starts once more from zero: the part file
    may hold the start of an older, different file.

    Returns:
        The bytes received over the wire (not counting what an earlier call left).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(target)
    received = 0
    fresh = not part.exists()

    def attempt() -> None:
        nonlocal received
        # Each attempt resumes from what the .part file holds.
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:
            part.unlink()
            offset = 0
        stream = client.download_stream(name, offset)
        # The first message describes the file; a refusal comes instead of it, before the
        # part file is touched.
        first = next(stream, None)
        if first is None:
            raise Unavailable(f"{name}: the stream ended before its first message")
        served = first.artifact
        if served.sha256 != sha256 or size not in (None, served.size):
            raise VerificationFailed(
                f"{name}: coordinator serves sha256 {served.sha256[:16]}.. "
                f"({served.size} bytes), expected {sha256[:16]}.."
                + ("" if size is None else f" ({size} bytes)")
            )
        with part.open("ab") as handle:
            for message in itertools.chain([first], stream):
                if message.data:
                    handle.write(message.data)
                    received += len(message.data)
                    if on_bytes is not None:
                        on_bytes(len(message.data))

    while True:
        try:
            client.retry.run(f"download of {name}", attempt)
        except VerificationFailed:
            part.unlink(missing_ok=True)  # the served file changed: what came is suspect
            raise
        except InvalidArgument:
            if not part.exists() or part.stat().st_size == 0:
                raise
            part.unlink()  # a part file longer than the file itself: start over
            fresh = True
            continue
        actual = file_sha256(part)
        length = part.stat().st_size
        if length == (length if size is None else size) and actual == sha256:
            os.replace(part, target)
            return received
        part.unlink()  # a corrupt partial file would poison every resume
        if not fresh:
            fresh = True
            continue
        raise VerificationFailed(
            f"{name}: expected sha256 {sha256[:16]}.."
            + ("" if size is None else f" ({size} bytes)")
            + f", got {actual[:16]}.. ({length} bytes)"
        )


def download_artifact(
    client: FederationClient,
    ref: ArtifactRef,
    dest_dir: Path,
    progress: bool = False,
    target: Path | None = None,
) -> Path:
    """Downloads ``ref`` to ``target`` (default ``dest_dir / ref.name``), resuming a ``.part``
    file, and verifies its size and sha256."""
    target = target if target is not None else dest_dir / ref.name
    if target.exists() and target.stat().st_size == ref.size and file_sha256(target) == ref.sha256:
        return target
    part = partial_path(target)
    resumed = part.stat().st_size if part.exists() else 0
    with progress_bars(progress) as tasks:
        advance = tasks.add(ref.name, ref.size, unit="bytes", completed=min(resumed, ref.size))
        download_to(client, ref.name, ref.sha256, target, size=ref.size, on_bytes=advance)
    return target
