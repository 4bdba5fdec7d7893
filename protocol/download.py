"""Resumable, verified artifact downloads (sites fetch shards and bases; readers fetch the
published ensemble). A download resumes from the size of its ``.part`` file after a dropped
connection or a coordinator restart, and a file is renamed into place only once its sha256
matches."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tqdm import tqdm

from protocol.client import FederationClient
from protocol.digests import file_sha256
from protocol.errors import VerificationFailed
from protocol.messages import ArtifactRef

log = logging.getLogger("atoll.download")


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        leave=False,
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
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")

    def attempt() -> None:
        # Each attempt resumes from what the .part file holds.
        offset = part.stat().st_size if part.exists() else 0
        if offset > ref.size:
            part.unlink()
            offset = 0
        with part.open("ab") as handle, progress_bar(ref.size, offset, ref.name, progress) as bar:
            for message in client.download_stream(ref.name, offset):
                if message.HasField("artifact") and message.artifact.sha256 != ref.sha256:
                    raise VerificationFailed(
                        f"artifact {ref.name}: coordinator serves sha256 "
                        f"{message.artifact.sha256[:16]}.., the assignment says {ref.sha256[:16]}.."
                    )
                if message.data:
                    handle.write(message.data)
                    bar.update(len(message.data))

    client.retry.run(f"download of {ref.name}", attempt)
    actual = file_sha256(part)
    size = part.stat().st_size
    if size != ref.size or actual != ref.sha256:
        part.unlink()  # a corrupt partial file would poison every resume
        raise VerificationFailed(
            f"artifact {ref.name}: expected sha256 {ref.sha256[:16]}.. ({ref.size} bytes), "
            f"got {actual[:16]}.. ({size} bytes)"
        )
    os.replace(part, target)
    return target
