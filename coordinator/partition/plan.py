"""From a data set to a partition plan on disk and in the store.

``make_plan`` does the work in order -- read and validate the data set, hash every image,
get one feature per unique image (cache, encoder or ``--features``), cluster, split the
text-only samples, count -- and ``write_plan`` puts the result under ``STATE/partition/``:

* ``centroids.safetensors`` -- ``centroids``, K x D float32 (the router's centroids), and with
  ``--center`` ``center``, the data set's mean feature (D float32) that routing subtracts;
* ``expert-<k>.json`` -- expert k's shard manifest: ``{"expert", "num_experts",
  "dataset_samples", "dataset_format", "samples": [...]}`` where each sample is the data set's
  own record plus ``image_sha256`` (one digest, or a list parallel to ``image``). InternVL
  records carry ``image`` joined with their data set's root and a ``dataset`` name, and the
  manifest has a ``datasets`` object with each data set's meta entry (``length`` = its samples
  in this shard);
* ``plan.json`` -- everything that determined the plan, the balance table, ``sample_experts``
  (the expert of every sample in data set order, -1 for skipped ones), the sha256 of every
  file above and ``digest``, the canonical-JSON digest of the rest.

Files are written to a temporary sibling directory and renamed into place, so ``partition/``
never holds a half-written plan; the same inputs and seed give the same bytes and digest, and
running again with them changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from coordinator.partition import kmeans
from coordinator.partition.dataset import Dataset, Sample, hash_images, load_dataset
from coordinator.partition.plan_features import plan_features
from coordinator.partition.plan_writer import PlanWriteResult, write_plan
from coordinator.state import StateDir
from protocol.digests import file_sha256
from protocol.errors import InvalidArgument, NotFound
from protocol.feature_model import mean_feature

__all__ = ["PartitionConfig", "Plan", "PlanWriteResult", "make_plan", "write_plan"]

PLAN_FORMAT = "atoll-partition-plan/1"
Algorithm = Literal["balanced", "two-stage"]
Assign = Literal["balanced", "nearest"]

Reporter = Callable[[str, int | None], Callable[[int], None]]
"""``reporter(task, total)`` returns an ``advance(n)`` callback for a progress bar."""


def _quiet(_task: str, _total: int | None) -> Callable[[int], None]:
    return lambda _n: None


@dataclass(frozen=True)
class PartitionConfig:
    """Everything that determines a plan (validated by :meth:`check`).

    Attributes:
        dataset: the LLaVA JSON/JSONL file or InternVL meta file.
        image_root: where relative image paths are resolved.
        experts: K.
        algorithm: ``balanced`` (one balanced spherical k-means) or ``two-stage``.
        assign: ``balanced`` (equal clusters) or ``nearest`` (argmax to the final centroids).
        encoder: an encoder spec (see ``features``), or None when ``features`` is given.
        features: a precomputed ``.npz`` of features.
        feature_encoder: the spec of the encoder that computed ``features`` (when the .npz
            does not name it).
        center: subtract the data set's mean feature before clustering (and routing).
        seed: seeds clustering and the text-only split.
        skip_missing: drop samples whose images are missing or unreadable instead of failing.
        tokenizer: a local tokenizer folder; when given, tokens are counted per cluster.
        max_iter: Lloyd iteration cap.
        max_points_per_centroid: Lloyd iterations fit on a random subsample of this many
            points per cluster (faiss's practice); the final balanced assignment always covers
            every image. None: every iteration uses every image.
        fine_clusters: the two-stage fine clustering size.
        two_stage_balance: ``samples`` (coarse clusters of equal size) or ``clusters``
            (equal numbers of fine clusters, the authors' variant).
        batch_size: images per encoder batch.
        workers: DataLoader worker processes for decoding images.
        device: torch device for the encoder (default: CUDA if available).
    """

    dataset: Path
    image_root: Path
    experts: int
    algorithm: Algorithm = "balanced"
    assign: Assign = "balanced"
    encoder: str | None = None
    features: Path | None = None
    feature_encoder: str | None = None
    center: bool = True
    seed: int = 0
    skip_missing: bool = False
    tokenizer: Path | None = None
    max_iter: int = 50
    max_points_per_centroid: int | None = 256
    fine_clusters: int = 1024
    two_stage_balance: Literal["samples", "clusters"] = "samples"
    batch_size: int = 64
    workers: int = 2
    device: str | None = None

    def check(self) -> None:
        """Raises InvalidArgument naming the setting to change."""
        if self.experts < 1:
            raise InvalidArgument(f"--experts: expected an integer >= 1, got {self.experts}")
        if self.encoder is not None and self.features is not None:
            raise InvalidArgument("give one of --encoder SPEC or --features FILE.npz, not both")
        if self.feature_encoder is not None and self.features is None:
            raise InvalidArgument(
                "--feature-encoder names the encoder of a --features file; with --encoder "
                "the features are computed here"
            )
        if self.algorithm not in ("balanced", "two-stage"):
            raise InvalidArgument(
                f"--algorithm: expected balanced or two-stage, not {self.algorithm!r}"
            )
        if self.assign not in ("balanced", "nearest"):
            raise InvalidArgument(f"--assign: expected balanced or nearest, not {self.assign!r}")
        if self.max_iter < 1:
            raise InvalidArgument(f"--max-iter: expected an integer >= 1, got {self.max_iter}")
        if self.max_points_per_centroid is not None and self.max_points_per_centroid < 1:
            raise InvalidArgument("--max-points-per-centroid: expected an integer >= 1")
        if self.fine_clusters < 1:
            raise InvalidArgument("--fine-clusters: expected an integer >= 1")
        if not self.image_root.is_dir():
            raise NotFound(f"--image-root {self.image_root}: no such directory")

    def parameters(self) -> dict[str, Any]:
        """The clustering parameters recorded in the plan."""
        params: dict[str, Any] = {
            "name": self.algorithm,
            "assign": self.assign,
            "max_iter": self.max_iter,
            "max_points_per_centroid": self.max_points_per_centroid,
        }
        if self.algorithm == "two-stage":
            params["epsilon"] = kmeans.DEFAULT_EPSILON
            params["fine_clusters"] = self.fine_clusters
            params["balance"] = self.two_stage_balance
        return params


@dataclass
class Plan:
    """A computed plan, not yet written.

    Attributes:
        document: ``plan.json`` without ``files`` and ``digest`` (added when written).
        centroids: K x D float32 (None for a text-only data set: no image router).
        shards: expert k's manifest, by k.
        summary: the balance table and totals (printed, and stored with the plan record).
        center: the data set's mean feature (D float32) with ``--center``, else None.
    """

    document: dict[str, Any]
    centroids: np.ndarray | None
    shards: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    center: np.ndarray | None = None


class _Groups:
    """Union-find over image digests: images that share a sample must share an expert, so
    they are clustered as one unit (almost always a single image)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        root = self.parent.setdefault(item, item)
        while root != self.parent[root]:
            root = self.parent[root]
        while item != root:  # path compression keeps later finds flat
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # deterministic representative


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

    groups = _Groups()
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
        unit_features = _unit_rows(unit_features)
        if config.center:
            # As the authors' code: cosines around the data set's mean feature, not the origin
            # (CLIP features share a large common direction that hides their differences).
            center = mean_feature(unit_features)
            unit_features = _unit_rows(unit_features - center)
        cluster_of_unit, centroids, fit = _cluster(config, unit_features, reporter)
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

    tokens = _token_counts(config.tokenizer, dataset.samples, reporter)
    shards, clusters = _shards(config, dataset, sample_experts, index.digests, groups, tokens)
    tokenizer_identity = _tokenizer_identity(config.tokenizer)
    document: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "num_experts": config.experts,
        "seed": config.seed,
        "dataset": {
            "file": config.dataset.name,
            "format": dataset.format,
            "sha256": dataset.sha256,
            "samples": len(dataset.samples),
            "image_references": len(references),
            "unique_images": len(unique),
            "text_only": len(text_only),
            "skipped": {
                "missing_images": len(missing),
                "unreadable_images": len(unreadable),
                "samples": skipped,
            },
        },
        "encoder": identity,
        "encoder_spec": None if features is None else features.encoder_spec,
        "features": None if features is None else features.source,
        "center": None if center is None else {"tensor": "center", "images": len(units)},
        "algorithm": {**config.parameters(), **fit} if centroids is not None else fit,
        "text_only": {"strategy": "random-equal", "seed": config.seed},
        "tokenizer": tokenizer_identity,
        "clusters": clusters,
        "sample_experts": sample_experts.tolist(),
    }
    summary = {
        "num_experts": config.experts,
        "dataset_sha256": dataset.sha256,
        "encoder": identity,
        "algorithm": document["algorithm"],
        "clusters": clusters,
        "skipped": document["dataset"]["skipped"],
    }
    return Plan(document, centroids, shards, summary, center)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # Opposite images in one group could cancel; their group then gets an arbitrary direction.
    zero = norms[:, 0] < 1e-12
    x[zero] = 0.0
    x[zero, 0] = 1.0
    norms[zero] = 1.0
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _cluster(
    config: PartitionConfig, features: np.ndarray, reporter: Reporter
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Cluster ids per unit, centroids, and what the fit did (iterations, objective)."""
    k = config.experts
    n = features.shape[0]
    advance = reporter("clustering", config.max_iter)
    if config.algorithm == "two-stage":
        staged = kmeans.two_stage_balanced_kmeans(
            features,
            k,
            fine_clusters=config.fine_clusters,
            balance=config.two_stage_balance,
            seed=config.seed,
            max_iter=config.max_iter,
        )
        result = staged.result
        fit: dict[str, Any] = {"fine_clusters_used": int(staged.fine_centroids.shape[0])}
    else:
        sample = n
        if config.max_points_per_centroid is not None:
            sample = min(n, config.max_points_per_centroid * k)
        rows = np.arange(n)
        if sample < n:
            rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5A3F]))
            rows = np.sort(rng.choice(n, sample, replace=False))
        result = kmeans.balanced_spherical_kmeans(
            features[rows] if sample < n else features,
            k,
            seed=config.seed,
            max_iter=config.max_iter,
            progress=lambda _i, _o: advance(1),
        )
        fit = {"fit_points": int(sample)}
        if sample < n:
            # The fit saw a subsample; every image gets its exact balanced assignment now.
            similarity = _similarity(features, result.centroids)
            labels, _ = kmeans.balanced_assignment(similarity, prices=result.prices)
            result = kmeans.KMeansResult(
                result.centroids,
                labels,
                float(np.take_along_axis(similarity, labels[:, None], 1).sum(dtype=np.float64)),
                result.iterations,
                result.converged,
                result.prices,
            )
    labels = result.labels
    if config.assign == "nearest":
        labels = kmeans.nearest_assignment(features, result.centroids)
    fit.update(
        {
            "iterations": result.iterations,
            "converged": result.converged,
            "mean_cosine": round(result.objective / n, 6),
        }
    )
    return labels, result.centroids, fit


def _similarity(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    import torch

    out = np.empty((features.shape[0], centroids.shape[0]), dtype=np.float32)
    x, c, o = torch.from_numpy(features), torch.from_numpy(centroids), torch.from_numpy(out)
    for start in range(0, features.shape[0], kmeans.DEFAULT_BLOCK):
        torch.mm(
            x[start : start + kmeans.DEFAULT_BLOCK],
            c.T,
            out=o[start : start + kmeans.DEFAULT_BLOCK],
        )
    return out


def _token_counts(
    tokenizer_path: Path | None, samples: list[Sample], reporter: Reporter
) -> list[int] | None:
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


def _tokenizer_identity(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {"name": path.name, "files": {p.name: file_sha256(p) for p in files}}


def _shards(
    config: PartitionConfig,
    dataset: Dataset,
    sample_experts: np.ndarray,
    digests: dict[str, str],
    groups: _Groups,
    tokens: list[int] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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
    shards: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    for expert in range(k):
        shard: dict[str, Any] = {
            "expert": expert,
            "num_experts": k,
            "dataset_samples": kept,
            "dataset_format": dataset.format,
        }
        if dataset.meta is not None:
            shard["datasets"] = {
                name: {**entry, "length": per_source[expert].get(name, 0)}
                for name, entry in dataset.meta.items()
            }
        shard["samples"] = samples[expert]
        shards.append(shard)
        row: dict[str, Any] = {
            "expert": expert,
            "unique_images": len(unique[expert]),
            "samples": len(samples[expert]),
            "image_samples": image_samples[expert],
            "text_only": text_only[expert],
        }
        if tokens is not None:
            row["tokens"] = token_totals[expert]
        clusters.append(row)
    return shards, clusters
