"""The partition plan (``STATE/partition/plan.json``): everything that determined the split.

``coordinator partition`` writes it next to the router's centroids and one shard manifest per
expert (:mod:`protocol.shard_manifest`); the coordinator serves it to sites as
``partition/plan.json``; ``coordinator assemble`` reads the encoder, the cluster sizes and
the digest from it. :func:`load_plan` is the one parser, :func:`plan_bytes` the one writer::

    {"format": "atoll-partition-plan/1", "num_experts": 2, "seed": 0,
     "dataset": {"file": "llava.json", "format": "llava", "sha256": "eb51...", "samples": 9,
                 "image_references": 6, "unique_images": 6, "text_only": 2,
                 "skipped": {"missing_images": 0, "unreadable_images": 0, "samples": 0}},
     "encoder": {"backend": "open_clip", "model": "atoll-tiny-clip", "dim": 32, ...},
     "encoder_spec": "open_clip:atoll-tiny-clip",
     "features": null,                       # or the --features file, digest, spot check
     "center": {"tensor": "center", "images": 5},   # null without --center
     "algorithm": {"name": "balanced", "assign": "balanced", "iterations": 2, ...},
     "text_only": {"strategy": "random-equal", "seed": 0},
     "tokenizer": null,                      # or {"name", "files": {name: sha256}}
     "clusters": [{"expert": 0, "unique_images": 3, "samples": 4, "image_samples": 3,
                   "text_only": 1}, ...],    # "tokens" too with --tokenizer
     "sample_experts": [1, 0, ...],          # each sample's expert in data set order, -1 skipped
     "files": {"centroids.safetensors": "5061...", "expert-0.json": "ccb7...", ...},
     "digest": "76fd..."}

``digest`` is the canonical-JSON sha256 of everything else (``files`` included), so the plan
digest covers every shard's and the centroids' bytes. ``encoder`` (the feature model's
identity) and ``algorithm`` (the clustering's parameters and fit) are kept as written: their
keys belong to the feature model and the clustering, which record what they need. A text-only
data set has ``encoder``, ``encoder_spec`` and ``center`` null and no centroids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, model_validator

from protocol.canonical import canonical_digest
from protocol.shard_manifest import shard_file_name
from protocol.validation import NonNegativeInt, Sha256Hex, StrictFormat, parse_model, read_json

__all__ = [
    "CENTROIDS_FILE",
    "PLAN_FILE",
    "PLAN_FORMAT",
    "ClusterRow",
    "PartitionPlan",
    "PlanCenter",
    "PlanContent",
    "PlanDataset",
    "SkippedCounts",
    "TextOnlySplit",
    "TokenizerIdentity",
    "load_plan",
    "parse_plan",
    "plan_bytes",
]

PLAN_FILE = "plan.json"
CENTROIDS_FILE = "centroids.safetensors"
PLAN_FORMAT: Final = "atoll-partition-plan/1"


class SkippedCounts(StrictFormat):
    """What ``--skip-missing`` dropped."""

    missing_images: NonNegativeInt
    unreadable_images: NonNegativeInt
    samples: NonNegativeInt


class PlanDataset(StrictFormat):
    """The data set the plan split: its file, digest and counts."""

    file: str = Field(min_length=1)
    format: Literal["llava", "internvl"]
    sha256: Sha256Hex
    samples: NonNegativeInt
    image_references: NonNegativeInt
    unique_images: NonNegativeInt
    text_only: NonNegativeInt
    skipped: SkippedCounts


class PlanCenter(StrictFormat):
    """``--center``: the data set's mean feature, a tensor of the centroids file."""

    tensor: str = Field(min_length=1)
    images: NonNegativeInt


class TextOnlySplit(StrictFormat):
    """How samples without an image were shared out: a seeded, equal random split."""

    strategy: Literal["random-equal"]
    seed: int


class TokenizerIdentity(StrictFormat):
    """The tokenizer that counted each cluster's tokens (``--tokenizer``)."""

    name: str
    files: dict[str, Sha256Hex]


class ClusterRow(StrictFormat):
    """One expert's share: its images, samples and (with ``--tokenizer``) tokens."""

    expert: NonNegativeInt
    unique_images: NonNegativeInt
    samples: NonNegativeInt
    image_samples: NonNegativeInt
    text_only: NonNegativeInt
    tokens: NonNegativeInt | None = None


class PlanContent(StrictFormat):
    """Everything that determined the plan: ``plan.json`` before ``files`` and ``digest``.

    Field order is the order ``plan.json`` is written in.
    """

    format: Literal["atoll-partition-plan/1"]
    num_experts: int = Field(ge=1, strict=True)
    seed: int
    dataset: PlanDataset
    encoder: dict[str, Any] | None
    encoder_spec: str | None = None
    features: dict[str, Any] | None = None
    center: PlanCenter | None = None
    algorithm: dict[str, Any]
    text_only: TextOnlySplit
    tokenizer: TokenizerIdentity | None = None
    clusters: list[ClusterRow]
    sample_experts: list[int]

    @model_validator(mode="after")
    def _consistent(self) -> PlanContent:
        k = self.num_experts
        experts = [row.expert for row in self.clusters]
        if experts != list(range(k)):
            raise ValueError(f"clusters: expected one row per expert 0..{k - 1}, got {experts}")
        if len(self.sample_experts) != self.dataset.samples:
            raise ValueError(
                f"sample_experts: expected {self.dataset.samples} entries (dataset.samples), "
                f"got {len(self.sample_experts)}"
            )
        wrong = next((e for e in self.sample_experts if not -1 <= e < k), None)
        if wrong is not None:
            raise ValueError(f"sample_experts: expected experts -1..{k - 1}, got {wrong}")
        return self

    def to_json(self) -> dict[str, Any]:
        """The document as written: the keys it was read or made with, in format order."""
        return self.model_dump(mode="json", exclude_unset=True)


class PartitionPlan(PlanContent):
    """The whole of ``plan.json``: the content, the sha256 of every file written with it,
    and the plan digest."""

    files: dict[str, Sha256Hex]
    digest: Sha256Hex

    @model_validator(mode="after")
    def _digest(self) -> PartitionPlan:
        shards = [shard_file_name(k) for k in range(self.num_experts)]
        missing = [name for name in shards if name not in self.files]
        if missing:
            raise ValueError(f"files: expected a sha256 for every shard, missing {missing}")
        document = self.to_json()
        del document["digest"]
        actual = canonical_digest(document)
        if actual != self.digest:
            raise ValueError(
                f"digest: expected {actual} (the canonical digest of the rest), got {self.digest}"
            )
        return self

    @classmethod
    def seal(cls, content: PlanContent, files: dict[str, str]) -> PartitionPlan:
        """The plan of ``content`` with the digests of its files, and its plan digest."""
        document = {**content.to_json(), "files": files}
        return parse_model(cls, {**document, "digest": canonical_digest(document)}, PLAN_FILE)


def plan_bytes(plan: PartitionPlan) -> bytes:
    """The bytes ``coordinator partition`` writes (indented JSON, one key a line)."""
    return (json.dumps(plan.to_json(), ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def parse_plan(data: Any, source: str = PLAN_FILE) -> PartitionPlan:
    """Validates a decoded ``plan.json``.

    Raises:
        InvalidArgument: naming each field that is wrong and what was expected.
    """
    return parse_model(PartitionPlan, data, source)


def load_plan(path: Path) -> PartitionPlan:
    """Reads and validates a ``plan.json`` (or the ``plan.json`` of a folder).

    Raises:
        NotFound: no such file.
        InvalidArgument: not JSON, or a field is wrong (named).
    """
    path = path / PLAN_FILE if path.is_dir() else path
    _, data = read_json(path, "partition plan")
    return parse_plan(data, f"partition plan {path}")
