"""What ``coordinator partition`` is asked to do: every setting that determines a plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from coordinator.partition import kmeans
from protocol.errors import InvalidArgument, NotFound

__all__ = ["Algorithm", "Assign", "PartitionConfig"]

Algorithm = Literal["balanced", "two-stage"]
Assign = Literal["balanced", "nearest"]


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
