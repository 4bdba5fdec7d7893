"""An expert's shard manifest (``expert-<k>.json``): its samples and the images they name.

Both sides read it: the trainer (``site_agent.training.data``) checks and encodes the samples,
the site agent finds which images it lacks, the coordinator indexes the images it may serve.
This module has no torch or numpy, so the agent and the coordinator load it cheaply.

The format (written by ``coordinator partition``)::

    {"expert": 0, "num_experts": 2, "dataset_samples": 130000, "dataset_format": "llava",
     "samples": [
        {"id": "1", "image": "coco/train2017/000000033471.jpg", "image_sha256": "9f3c...",
         "conversations": [...]},
        {"id": "text-1", "conversations": [...]},
        {"id": "multi", "image": ["a.jpg", "b.jpg"], "image_sha256": ["..", ".."], ...}]}

An InternVL shard also has ``datasets`` (each data set's meta entry, ``length`` counting its
samples in this shard) and each sample a ``dataset`` name. :class:`ShardManifest` is the one
parser every side uses; :func:`shard_manifest_bytes` the one writer; :func:`shard_file_name`
and :func:`shard_artifact_name` the one spelling of its name. A bare JSON list of samples is
accepted too (then K is unknown). Image paths are relative to
an image root: the site's own copy, or the workdir's ``images/`` the agent fills from the
coordinator.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import PlainValidator, PrivateAttr

from protocol.digests import check_sha256_hex
from protocol.errors import InvalidArgument
from protocol.validation import NonNegativeInt, StrictFormat, parse_model, read_json

__all__ = [
    "IMAGE_PREFIX",
    "PARTITION_PREFIX",
    "ShardManifest",
    "image_artifact_name",
    "image_path",
    "load_shard_manifest",
    "parse_shard_manifest",
    "sample_images",
    "sample_name",
    "shard_artifact_name",
    "shard_file_name",
    "shard_images",
    "shard_manifest_bytes",
]

# A site with no copy of an image asks the coordinator for it by content: images/<sha256>.
IMAGE_PREFIX = "images/"
# The coordinator serves the plan's files (plan.json, centroids, shards) under this prefix.
PARTITION_PREFIX = "partition/"


def image_artifact_name(sha256: str) -> str:
    """The name ``DownloadArtifact`` serves a shard image under: ``images/<sha256>``."""
    return IMAGE_PREFIX + sha256


def shard_file_name(expert: int) -> str:
    """Expert k's shard manifest in the plan's folder: ``expert-<k>.json``."""
    return f"expert-{expert}.json"


def shard_artifact_name(expert: int) -> str:
    """The artifact a site downloads expert k's shard manifest as: ``partition/expert-<k>.json``."""
    return PARTITION_PREFIX + shard_file_name(expert)


def _sample_records(value: Any) -> list[dict[str, Any]]:
    # Checked, not copied: a shard holds up to hundreds of thousands of records, and
    # pydantic's copy of each would cost more than reading the file.
    if not isinstance(value, list):
        raise ValueError(f"expected a list of sample objects, got {type(value).__name__}")
    for index, sample in enumerate(value):
        if not isinstance(sample, dict):
            raise ValueError(f"samples[{index}]: expected an object, got {type(sample).__name__}")
    return value


class ShardManifest(StrictFormat):
    """An expert's shard, as ``coordinator partition`` writes it and every side reads it.

    ``samples`` stay the data set's own records (LLaVA JSON objects or InternVL JSONL lines,
    plus ``image_sha256`` and, for InternVL, ``dataset``): the trainer hands them to the chat
    template as they are, and :func:`sample_images` checks their image fields where they are
    used. ``path`` and ``sha256`` say which file was read (they are not part of it).

    Attributes:
        expert: k, when the manifest says.
        num_experts: K, when the manifest says.
        dataset_samples: Samples in the whole data set (after skipped ones), when it says.
        dataset_format: ``llava`` or ``internvl``, when it says.
        datasets: InternVL only: each data set's meta entry, ``length`` = its samples here.
        samples: The records.
    """

    expert: NonNegativeInt | None = None
    num_experts: NonNegativeInt | None = None
    dataset_samples: NonNegativeInt | None = None
    dataset_format: Literal["llava", "internvl"] | None = None
    datasets: dict[str, dict[str, Any]] | None = None
    samples: Annotated[list[dict[str, Any]], PlainValidator(_sample_records)]
    _path: Path = PrivateAttr(default=Path("expert.json"))
    _sha256: str = PrivateAttr(default="")

    @property
    def path(self) -> Path:
        """Where the manifest was read from (named in every error)."""
        return self._path

    @property
    def sha256(self) -> str:
        """The sha256 of the file's bytes (what provenance cites)."""
        return self._sha256

    def to_json(self) -> dict[str, Any]:
        """The document as written: fields in order, absent ones (None) left out."""
        names = type(self).model_fields
        return {name: value for name in names if (value := getattr(self, name)) is not None}


def shard_manifest_bytes(manifest: ShardManifest) -> bytes:
    """The bytes ``coordinator partition`` writes (compact JSON, one line): their sha256 is
    the shard digest sites sign, so this layout must never change."""
    text = json.dumps(manifest.to_json(), ensure_ascii=False, separators=(",", ":"))
    return (text + "\n").encode("utf-8")


def parse_shard_manifest(raw: bytes, document: Any, path: Path) -> ShardManifest:
    """Validates a decoded shard manifest read from ``path`` (``raw``: the file's bytes).

    Raises:
        InvalidArgument: naming the file and each field that is wrong.
    """
    where = f"shard manifest {path}"
    if isinstance(document, list):  # a bare list of samples (then K is unknown)
        document = {"samples": document}
    if not isinstance(document, dict) or not isinstance(document.get("samples"), list):
        raise InvalidArgument(f"{where}: expected an object with a 'samples' list")
    for index, sample in enumerate(document["samples"]):
        if not isinstance(sample, dict):
            raise InvalidArgument(f"{where}: samples[{index}]: expected an object")
    manifest = parse_model(ShardManifest, document, where)
    manifest._path = path
    manifest._sha256 = hashlib.sha256(raw).hexdigest()
    return manifest


def load_shard_manifest(path: Path) -> ShardManifest:
    """Reads a shard manifest and checks its shape (not yet its images).

    Raises:
        NotFound: no such file.
        InvalidArgument: not JSON, or not an object with a ``samples`` list of objects, or a
            field of the wrong type (named).
    """
    raw, document = read_json(path, "shard manifest")
    return parse_shard_manifest(raw, document, path)


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
