"""An expert's shard manifest (``expert-<k>.json``): its samples and the images they name.

Both sides read it: the trainer (``site_agent.training.data``) checks and encodes the samples,
the site agent finds which images it lacks, the coordinator indexes the images it may serve.
This module has no torch or numpy, so the agent and the coordinator load it cheaply.

The format (written by ``coordinator partition``)::

    {"expert": 0, "num_experts": 2, "dataset_samples": 130000,
     "samples": [
        {"id": "1", "image": "coco/train2017/000000033471.jpg", "image_sha256": "9f3c...",
         "conversations": [...]},
        {"id": "text-1", "conversations": [...]},
        {"id": "multi", "image": ["a.jpg", "b.jpg"], "image_sha256": ["..", ".."], ...}]}

A bare JSON list of samples is accepted too (then K is unknown). Image paths are relative to
an image root: the site's own copy, or the workdir's ``images/`` the agent fills from the
coordinator.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.digests import check_sha256_hex
from protocol.errors import InvalidArgument, NotFound

__all__ = [
    "IMAGE_PREFIX",
    "ShardManifest",
    "image_artifact_name",
    "image_path",
    "load_shard_manifest",
    "sample_images",
    "sample_name",
    "shard_images",
]

# A site with no copy of an image asks the coordinator for it by content: images/<sha256>.
IMAGE_PREFIX = "images/"


def image_artifact_name(sha256: str) -> str:
    """The name ``DownloadArtifact`` serves a shard image under: ``images/<sha256>``."""
    return IMAGE_PREFIX + sha256


@dataclass(frozen=True)
class ShardManifest:
    """An expert's shard, as read from ``expert-<k>.json``.

    Attributes:
        path: Where it was read from (named in every error).
        sha256: Digest of the file's bytes.
        samples: The records, in the data set's own format.
        expert: k, when the manifest says.
        num_experts: K, when the manifest says.
        dataset_samples: Samples in the whole data set, when the manifest says.
    """

    path: Path
    sha256: str
    samples: list[dict[str, Any]]
    expert: int | None = None
    num_experts: int | None = None
    dataset_samples: int | None = None


def _optional_int(document: dict[str, Any], key: str, where: str) -> int | None:
    value = document.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{where}: {key}: expected a non-negative integer, got {value!r}")
    return value


def load_shard_manifest(path: Path) -> ShardManifest:
    """Reads a shard manifest and checks its shape (not yet its images).

    Raises:
        NotFound: no such file.
        InvalidArgument: not JSON, or not an object with a ``samples`` list of objects.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"shard manifest {path}: no such file") from None
    where = f"shard manifest {path.name}"
    try:
        document = json.loads(raw)
    except ValueError as error:
        raise InvalidArgument(f"{where}: not valid JSON ({error})") from None
    if isinstance(document, list):
        document = {"samples": document}
    if not isinstance(document, dict) or not isinstance(document.get("samples"), list):
        raise InvalidArgument(f"{where}: expected an object with a 'samples' list")
    samples = document["samples"]
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise InvalidArgument(f"{where}: samples[{index}]: expected an object")
    return ShardManifest(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        samples=samples,
        expert=_optional_int(document, "expert", where),
        num_experts=_optional_int(document, "num_experts", where),
        dataset_samples=_optional_int(document, "dataset_samples", where),
    )


def sample_name(sample: dict[str, Any], index: int) -> str:
    """How errors name a sample: its index, and its id when it has one."""
    return f"samples[{index}] (id {sample['id']!r})" if "id" in sample else f"samples[{index}]"


def sample_images(sample: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """The (relative path, sha256) of each image of a sample, in order.

    Raises:
        InvalidArgument: ``image`` and ``image_sha256`` are malformed or not parallel.
    """
    images = sample.get("image")
    if images is None:
        return []
    digests = sample.get("image_sha256")
    if isinstance(images, str):
        images, digests = [images], [digests] if isinstance(digests, str) else digests
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise InvalidArgument(f"{where}: image: expected a path or a list of paths")
    if not isinstance(digests, list) or len(digests) != len(images):
        raise InvalidArgument(
            f"{where}: image_sha256: expected one sha256 per image ({len(images)}), got {digests!r}"
        )
    for digest in digests:
        check_sha256_hex(
            digest if isinstance(digest, str) else repr(digest), f"{where}: image_sha256"
        )
    return list(zip(images, digests, strict=True))


def shard_images(manifest: ShardManifest) -> dict[str, tuple[str, str]]:
    """Every distinct image path of the shard: ``{relative path: (sha256, first sample)}``.

    Raises:
        InvalidArgument: a sample's image fields are malformed, or two samples give the same
            image different digests.
    """
    where_file = f"shard manifest {manifest.path.name}"
    expected: dict[str, tuple[str, str]] = {}
    for index, sample in enumerate(manifest.samples):
        where = f"{where_file}: {sample_name(sample, index)}"
        for relative, digest in sample_images(sample, where):
            seen = expected.setdefault(relative, (digest, where))
            if seen[0] != digest:
                raise InvalidArgument(
                    f"{where}: image {relative!r} has sha256 {digest[:16]}.., but {seen[1]} "
                    f"gives {seen[0][:16]}.."
                )
    return expected


def image_path(image_root: Path, relative: str, where: str) -> Path:
    """Where image ``relative`` lives under ``image_root``.

    The check is on the path as written (no ``..`` or absolute path may leave the root), not
    on where symlinks lead: a site may link files of its own copy into the workdir's root.

    Raises:
        InvalidArgument: the path leaves the image root.
    """
    root = Path(os.path.abspath(image_root))
    path = Path(os.path.normpath(root / relative))
    if not path.is_relative_to(root) or path == root:
        raise InvalidArgument(f"{where}: image {relative!r} points outside the image root")
    return path
