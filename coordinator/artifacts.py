"""Files the coordinator serves to sites and readers, and the resumable download behind
``DownloadArtifact``."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

from coordinator.state import StateDir
from coordinator.store import ArtifactRecord, SiteRecord, Store
from protocol.digests import file_sha256
from protocol.errors import InvalidArgument, NotFound, PermissionDenied

log = logging.getLogger("atoll.coordinator")
CHUNK_SIZE = 1 << 20
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


def check_artifact_name(name: str) -> str:
    if not _ARTIFACT_NAME.match(name) or ".." in name.split("/"):
        raise InvalidArgument(
            f"artifact name {name!r}: expected letters, digits, '.', '_', '-' and '/' "
            "(no '..', no leading '/')"
        )
    return name


def register_artifact(
    state: StateDir,
    store: Store,
    name: str,
    path: Path,
    *,
    expert: int | None = None,
    audience: str = "sites",
    sha256: str | None = None,
) -> ArtifactRecord:
    """Serves the file at ``path`` (inside the state directory) under ``name``.

    The digest is computed now, once (or given as ``sha256`` by a caller that hashed the file
    as it wrote it); the file must not change afterwards (downloads verify it).
    """
    check_artifact_name(name)
    resolved = path.resolve()
    root = state.root.resolve()
    if not resolved.is_relative_to(root):
        raise InvalidArgument(f"artifact {name!r}: {path} is outside the state directory {root}")
    if not resolved.is_file():
        raise NotFound(f"artifact {name!r}: {path} is not a file")
    record = ArtifactRecord(
        name=name,
        path=resolved.relative_to(root).as_posix(),
        size=resolved.stat().st_size,
        sha256=sha256 or file_sha256(resolved),
        expert=expert,
        audience=audience,
    )
    store.put_artifact(record)
    return record


def authorize_site_download(store: Store, site: SiteRecord, name: str) -> ArtifactRecord:
    """The artifact ``name`` if this site may read it: shared ones, and its own expert's."""
    artifact = store.get_artifact(name)
    if artifact is None:
        raise NotFound(f"no artifact named {name!r}")
    if artifact.audience != "sites" and artifact.expert is None:
        return artifact  # published ensemble files: readable by every authenticated caller
    if artifact.expert is not None:
        assignment = store.get_assignment(site.name)
        if assignment is None or assignment.expert_index != artifact.expert:
            raise PermissionDenied(
                f"artifact {name!r} belongs to expert {artifact.expert}, "
                f"which is not assigned to site {site.name!r}"
            )
    return artifact


def authorize_reader_download(store: Store, name: str) -> ArtifactRecord:
    """The artifact ``name`` if a reader may read it: the published ensemble's files only."""
    artifact = store.get_artifact(name)
    if artifact is None or artifact.audience != "readers":
        # A site-only artifact gets the same answer as a missing one: readers learn nothing.
        raise NotFound(f"no published ensemble file named {name!r}")
    return artifact


def read_chunks(
    state: StateDir, artifact: ArtifactRecord, offset: int, chunk_size: int = CHUNK_SIZE
) -> Iterator[tuple[int, bytes]]:
    """Yields ``(offset, bytes)`` from ``offset`` to the end, one chunk in memory at a time."""
    if offset > artifact.size:
        raise InvalidArgument(
            f"artifact {artifact.name!r}: offset {offset} is past its size {artifact.size}"
        )
    path = state.root / artifact.path
    with path.open("rb") as handle:
        handle.seek(offset)
        while offset < artifact.size:
            data = handle.read(min(chunk_size, artifact.size - offset))
            if not data:
                # The path stays in the coordinator's log: a site has no use for it.
                log.error("[Artifacts] %s is shorter than its record says", path)
                raise NotFound(f"artifact {artifact.name!r} is shorter than recorded")
            yield offset, data
            offset += len(data)
