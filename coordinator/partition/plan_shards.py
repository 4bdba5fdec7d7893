"""A plan's shard manifests and balance table: each kept sample in its expert's shard (with
``image_sha256``, and for InternVL its data set's name and meta entry), counted per expert in
images, samples, text-only samples and, with ``--tokenizer``, tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coordinator.partition.config import PartitionConfig
from coordinator.partition.dataset import Dataset, Sample
from coordinator.partition.plan_clustering import ImageGroups, Reporter
from protocol.digests import file_sha256
from protocol.errors import InvalidArgument, NotFound
from protocol.partition_plan import ClusterRow, TokenizerIdentity
from protocol.shard_manifest import ShardManifest

__all__ = ["build_shards", "token_counts", "tokenizer_identity"]


def token_counts(
    tokenizer_path: Path | None, samples: list[Sample], reporter: Reporter
) -> list[int] | None:
    """Each sample's tokens under ``--tokenizer`` (None without one)."""
    if tokenizer_path is None:
        return None
    if not tokenizer_path.is_dir():
        raise NotFound(f"--tokenizer {tokenizer_path}: no such directory")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"--tokenizer {tokenizer_path}: not a tokenizer ({error})") from None
    advance = reporter("counting tokens", len(samples))
    counts: list[int] = []
    for sample in samples:
        values = [turn["value"] for turn in sample.record["conversations"]]
        encoded = tokenizer(values, add_special_tokens=False)["input_ids"]
        counts.append(sum(len(ids) for ids in encoded))
        advance(1)
    return counts


def tokenizer_identity(path: Path | None) -> TokenizerIdentity | None:
    """The tokenizer's folder name and the sha256 of each of its files."""
    if path is None:
        return None
    files = sorted(p for p in path.iterdir() if p.is_file())
    return TokenizerIdentity(name=path.name, files={p.name: file_sha256(p) for p in files})


def build_shards(
    config: PartitionConfig,
    dataset: Dataset,
    sample_experts: np.ndarray,
    digests: dict[str, str],
    groups: ImageGroups,
    tokens: list[int] | None,
) -> tuple[list[ShardManifest], list[ClusterRow]]:
    """Expert k's shard manifest and balance-table row, by k."""
    k = config.experts
    samples: list[list[dict[str, Any]]] = [[] for _ in range(k)]
    unique: list[set[str]] = [set() for _ in range(k)]
    image_samples = [0] * k
    text_only = [0] * k
    token_totals = [0] * k
    per_source: list[dict[str, int]] = [{} for _ in range(k)]
    for i, sample in enumerate(dataset.samples):
        expert = int(sample_experts[i])
        if expert < 0:
            continue
        record = dict(sample.record)
        if sample.images:
            image_samples[expert] += 1
            shas = [digests[image] for image in sample.images]
            unique[expert].update(shas)
            if dataset.format == "internvl":
                # Paths joined with the data set's root, so one image root serves every set.
                joined = list(sample.images)
                record["image"] = joined[0] if isinstance(sample.record["image"], str) else joined
            record["image_sha256"] = shas[0] if isinstance(sample.record["image"], str) else shas
        else:
            text_only[expert] += 1
        if sample.source is not None:
            record["dataset"] = sample.source
            per_source[expert][sample.source] = per_source[expert].get(sample.source, 0) + 1
        if tokens is not None:
            token_totals[expert] += tokens[i]
        samples[expert].append(record)
    kept = int((sample_experts >= 0).sum())
    shards: list[ShardManifest] = []
    clusters: list[ClusterRow] = []
    for expert in range(k):
        datasets = None
        if dataset.meta is not None:
            datasets = {
                name: {**entry, "length": per_source[expert].get(name, 0)}
                for name, entry in dataset.meta.items()
            }
        shard = ShardManifest(
            expert=expert,
            num_experts=k,
            dataset_samples=kept,
            dataset_format=dataset.format,
            datasets=datasets,
            samples=samples[expert],
        )
        shards.append(shard)
        row: dict[str, Any] = {
            "expert": expert,
            "unique_images": len(unique[expert]),
            "samples": len(samples[expert]),
            "image_samples": image_samples[expert],
            "text_only": text_only[expert],
        }
        if tokens is not None:  # absent, not null, without --tokenizer: the plan's bytes
            row["tokens"] = token_totals[expert]
        clusters.append(ClusterRow(**row))
    return shards, clusters
