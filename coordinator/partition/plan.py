"""From a data set to a partition plan on disk and in the store.

``make_plan`` does the work in order -- read and validate the data set, hash every image,
get one feature per unique image (cache, encoder or ``--features``), cluster, split the
text-only samples, count -- and ``write_plan`` puts the result under ``STATE/partition/``:

* ``centroids.safetensors`` -- ``centroids``, K x D float32 (the router's centroids), and with
  ``--center`` ``center``, the data set's mean feature (D float32) that routing subtracts;
* ``expert-<k>.json`` -- expert k's shard manifest (:mod:`protocol.shard_manifest`): the data
  set's own records plus ``image_sha256``;
* ``plan.json`` -- the plan (:mod:`protocol.partition_plan`): everything that determined it,
  the balance table, every sample's expert, the sha256 of every file above and the digest.

The steps live beside this module: ``plan_features`` (one feature per image),
``plan_clustering`` (images that share a sample as one unit, k-means), ``plan_shards`` (the
shard manifests and balance table) and ``plan_writer`` (the files, and the store's records).
Files are written to a temporary sibling directory and renamed into place, so ``partition/``
never holds a half-written plan; the same inputs and seed give the same bytes and digest, and
running again with them changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.partition.config import PartitionConfig
from coordinator.partition.dataset import hash_images, load_dataset
from coordinator.partition.plan_clustering import ImageGroups, Reporter, cluster_units, unit_rows
from coordinator.partition.plan_features import plan_features
from coordinator.partition.plan_shards import build_shards, token_counts, tokenizer_identity
from coordinator.partition.plan_writer import PlanWriteResult, write_plan
from coordinator.state import StateDir
from protocol.errors import InvalidArgument, NotFound
from protocol.feature_model import mean_feature
from protocol.partition_plan import (
    PLAN_FORMAT,
    PlanCenter,
    PlanContent,
    PlanDataset,
    SkippedCounts,
    TextOnlySplit,
)
from protocol.shard_manifest import ShardManifest

__all__ = ["PartitionConfig", "Plan", "PlanWriteResult", "make_plan", "write_plan"]


def _quiet(_task: str, _total: int | None) -> Callable[[int], None]:
    return lambda _n: None


@dataclass
class Plan:
    """A computed plan, not yet written.

    Attributes:
        content: ``plan.json`` without ``files`` and ``digest`` (added when written).
        centroids: K x D float32 (None for a text-only data set: no image router).
        shards: expert k's shard manifest, by k.
        summary: the balance table and totals (printed, and stored with the plan record).
        center: the data set's mean feature (D float32) with ``--center``, else None.
    """

    content: PlanContent
    centroids: np.ndarray | None
    shards: list[ShardManifest]
    summary: dict[str, Any] = field(default_factory=dict)
    center: np.ndarray | None = None


def make_plan(config: PartitionConfig, state: StateDir, reporter: Reporter = _quiet) -> Plan:
    """Computes the plan (no files written except feature-cache shards).

    Raises:
        InvalidArgument, NotFound: bad input, named precisely.
    """
    config.check()
    dataset = load_dataset(config.dataset)
    references = dataset.image_references
    index = hash_images(
        references, config.image_root, progress=reporter("hashing images", len(references))
    )
    missing = {ref for ref, _ in index.missing}
    if missing and not config.skip_missing:
        raise NotFound(
            f"{len(missing)} image(s) of {config.dataset} are missing or unreadable under "
            f"{config.image_root}: {index.describe_missing()} (--skip-missing drops their samples)"
        )
    kept_refs = [ref for ref in references if ref not in missing]
    if references and config.encoder is None and config.features is None:
        raise InvalidArgument(
            f"{config.dataset} has {len(references)} image reference(s) to cluster: give "
            "--encoder SPEC or --features FILE.npz"
        )
    # A text-only data set (the c-BTM case) has nothing to cluster and no image router.
    features = (
        plan_features(config, state, index.digests, kept_refs, reporter) if references else None
    )
    identity = None if features is None else features.identity
    unreadable = [] if features is None else features.unreadable
    if unreadable and not config.skip_missing:
        shown = ", ".join(f"{ref} ({why})" for ref, why in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        raise InvalidArgument(
            f"{len(unreadable)} image(s) could not be decoded: {shown}{more} "
            "(--skip-missing drops their samples)"
        )
    bad = missing | {ref for ref, _ in unreadable}
    kept = [s for s in dataset.samples if not any(image in bad for image in s.images)]
    skipped = len(dataset.samples) - len(kept)

    groups = ImageGroups()
    for sample in kept:
        digests = [index.digests[image] for image in sample.images]
        for other in digests[1:]:
            groups.union(digests[0], other)
    unique = sorted({index.digests[image] for s in kept for image in s.images})
    units = sorted({groups.find(d) for d in unique})
    if references and config.experts > len(units):
        raise InvalidArgument(
            f"--experts {config.experts} is larger than the number of unique images "
            f"({len(units)}{' image groups' if len(units) != len(unique) else ''}) in "
            f"{config.dataset}; every expert needs at least one image"
        )
    unit_of = {unit: row for row, unit in enumerate(units)}
    center, centroids = None, None
    cluster_of_unit: np.ndarray = np.zeros(0, dtype=np.int64)
    fit: dict[str, Any] = {"name": "random-equal", "images": 0}
    if features is not None and identity is not None:
        unit_features = np.zeros((len(units), identity["dim"]), dtype=np.float32)
        for digest in unique:
            unit_features[unit_of[groups.find(digest)]] += features.by_digest[digest]
        # A group's feature is the mean direction of its images (most groups are one image).
        unit_features = unit_rows(unit_features)
        if config.center:
            # As the authors' code: cosines around the data set's mean feature, not the origin
            # (CLIP features share a large common direction that hides their differences).
            center = mean_feature(unit_features)
            unit_features = unit_rows(unit_features - center)
        cluster_of_unit, centroids, fit = cluster_units(config, unit_features, reporter)
    sample_experts = np.full(len(dataset.samples), -1, dtype=np.int64)
    text_only: list[int] = []
    position = {id(s): i for i, s in enumerate(dataset.samples)}
    for sample in kept:
        i = position[id(sample)]
        if sample.images:
            unit = unit_of[groups.find(index.digests[sample.images[0]])]
            sample_experts[i] = cluster_of_unit[unit]
        else:
            text_only.append(i)
    # Text-only samples: a seeded random, equal split (counts differ by at most one).
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x7E47]))
    order = rng.permutation(len(text_only))
    for rank, j in enumerate(order):
        sample_experts[text_only[j]] = rank % config.experts

    tokens = token_counts(config.tokenizer, dataset.samples, reporter)
    shards, clusters = build_shards(config, dataset, sample_experts, index.digests, groups, tokens)
    skipped_counts = SkippedCounts(
        missing_images=len(missing), unreadable_images=len(unreadable), samples=skipped
    )
    algorithm = {**config.parameters(), **fit} if centroids is not None else fit
    content = PlanContent(
        format=PLAN_FORMAT,
        num_experts=config.experts,
        seed=config.seed,
        dataset=PlanDataset(
            file=config.dataset.name,
            format=dataset.format,
            sha256=dataset.sha256,
            samples=len(dataset.samples),
            image_references=len(references),
            unique_images=len(unique),
            text_only=len(text_only),
            skipped=skipped_counts,
        ),
        encoder=identity,
        encoder_spec=None if features is None else features.encoder_spec,
        features=None if features is None else features.source,
        center=None if center is None else PlanCenter(tensor="center", images=len(units)),
        algorithm=algorithm,
        text_only=TextOnlySplit(strategy="random-equal", seed=config.seed),
        tokenizer=tokenizer_identity(config.tokenizer),
        clusters=clusters,
        sample_experts=sample_experts.tolist(),
    )
    summary = {
        "num_experts": config.experts,
        "dataset_sha256": dataset.sha256,
        "encoder": identity,
        "algorithm": algorithm,
        "clusters": [row.model_dump(exclude_unset=True) for row in clusters],
        "skipped": skipped_counts.model_dump(),
    }
    return Plan(content, centroids, shards, summary, center)
