"""The router: which experts answer a prompt, and with what weight.

``p(S_k | image) = softmax_k(tau * cos(f(image), c_k))`` where ``f`` is the partition plan's
feature model and ``c_k`` its centroids; keep the top-k, renormalise. The features must be
exactly the ones the partitioner computed for the same image, so ``f`` is not reimplemented
here: :func:`load_feature_model` is the partitioner's own feature model
(:mod:`protocol.feature_model`), loaded from the ensemble's copy of its files, and the plan's
mean feature is subtracted by the same :func:`~protocol.feature_model.centre`.

Example::

    router = Router(centroids, tau=50.0, top_k=2)
    routing = router.route(encoder.encode_images([image]))
    routing.experts, routing.weights        # (1, 2) expert indices, (1, 2) weights summing to 1
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from protocol.ensemble_manifest import EnsembleManifest
from protocol.errors import InvalidArgument, NotFound
from protocol.feature_model import FeatureModel, centre, load_feature_model

__all__ = [
    "FeatureModel",
    "Router",
    "Routing",
    "load_centroids",
    "load_feature_model",
    "load_router",
    "open_image",
]


@dataclass(frozen=True)
class Routing:
    """The router's decision for a batch.

    Attributes:
        experts: ``(B, k)`` expert indices, most probable first.
        weights: ``(B, k)`` their renormalised probabilities (rows sum to 1).
        probabilities: ``(B, K)`` the full ``p(S_k | input)`` before the top-k cut.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    probabilities: torch.Tensor


class Router:
    """Cosine router over the plan's centroids.

    Args:
        centroids: ``(K, D)`` cluster centroids (normalised here); None for experts trained
            on a text-only data set (no image router; ``num_experts`` then gives K).
        tau: Inverse temperature; larger is sharper. Must be > 0.
        top_k: Experts kept per input, 1..K.
        num_experts: If given, the number of experts the centroids must match.
        available: Indices of the experts that exist (a partial ensemble); the others get
            probability 0 and the rest is renormalised. Default: all.
        center: ``(D,)`` the plan's mean feature (a plan made with ``--center``): each unit
            feature has it subtracted before the cosine, as the partitioner did.

    Raises:
        InvalidArgument: a bad ``tau``, ``top_k``, centroid shape or count.
    """

    def __init__(
        self,
        centroids: torch.Tensor | None,
        tau: float,
        top_k: int,
        *,
        num_experts: int | None = None,
        available: Sequence[int] | None = None,
        center: torch.Tensor | None = None,
    ) -> None:
        if centroids is None:
            if num_experts is None or num_experts < 1:
                raise InvalidArgument("router: without centroids, num_experts is required")
            count, centroids_or_none = num_experts, None
        else:
            centroids_or_none = self._checked(centroids, num_experts, center)
            count = int(centroids.shape[0])
        if not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
            raise InvalidArgument(f"router tau: expected a finite number > 0, got {tau!r}")
        self.num_experts = count
        self.available = sorted(set(available)) if available is not None else None
        if self.available is not None and (
            not self.available or not set(self.available) <= set(range(self.num_experts))
        ):
            raise InvalidArgument(
                f"router available experts: expected indices in 0..{self.num_experts - 1}, "
                f"got {list(available or [])}"
            )
        self.centroids = centroids_or_none
        self.center = None if center is None else center.detach().float()
        self.tau = float(tau)
        self.top_k = self._check_top_k(top_k)

    @staticmethod
    def _checked(
        centroids: torch.Tensor, num_experts: int | None, center: torch.Tensor | None
    ) -> torch.Tensor:
        if centroids.ndim != 2 or centroids.shape[0] < 1 or centroids.shape[1] < 1:
            raise InvalidArgument(
                f"router centroids: expected a (K, D) matrix, got shape {tuple(centroids.shape)}"
            )
        if num_experts is not None and centroids.shape[0] != num_experts:
            raise InvalidArgument(
                f"router centroids: {centroids.shape[0]} centroids for {num_experts} experts "
                "(one centroid per expert expected)"
            )
        centroids = centroids.detach().float()
        norms = centroids.norm(dim=1)
        if not torch.isfinite(centroids).all() or bool((norms == 0).any()):
            raise InvalidArgument("router centroids: expected finite, non-zero rows")
        if center is not None and (
            tuple(center.shape) != (centroids.shape[1],) or not torch.isfinite(center).all()
        ):
            raise InvalidArgument(
                f"router center: expected {centroids.shape[1]} finite numbers (the mean "
                f"feature), got shape {tuple(center.shape)}"
            )
        return centroids / norms[:, None]

    @property
    def num_available(self) -> int:
        """How many experts can be routed to."""
        return self.num_experts if self.available is None else len(self.available)

    def _check_top_k(self, top_k: int) -> int:
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, int)
            or not (1 <= top_k <= self.num_available)
        ):
            raise InvalidArgument(
                f"top_k: expected an integer in 1..{self.num_available} "
                f"(the available experts), got {top_k!r}"
            )
        return top_k

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.available is None:
            return logits
        keep = torch.zeros(self.num_experts, dtype=torch.bool, device=logits.device)
        keep[self.available] = True
        return logits.masked_fill(~keep, float("-inf"))

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` ``softmax(tau * cos(features, c_k))`` over the available experts."""
        return self.probabilities_at(self.cosines(features), self.tau)

    def cosines(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` cosines of the (centred) features with the centroids."""
        if self.centroids is None:
            raise InvalidArgument(
                "this ensemble has no image router: its experts were trained on text only"
            )
        if features.ndim != 2 or features.shape[1] != self.centroids.shape[1]:
            raise InvalidArgument(
                f"router features: expected (B, {self.centroids.shape[1]}), "
                f"got {tuple(features.shape)}"
            )
        unit = centre(torch.nn.functional.normalize(features.float(), dim=-1), self.center)
        return unit @ self.centroids.to(features.device).T

    def probabilities_at(self, cosines: torch.Tensor, tau: float) -> torch.Tensor:
        """``softmax(tau * cosines)`` over the available experts (fitting tau uses others)."""
        return torch.softmax(self._mask(tau * cosines), dim=-1)

    def select(self, probabilities: torch.Tensor, top_k: int | None = None) -> Routing:
        """Keeps the ``top_k`` (default: the router's) most probable experts, renormalised."""
        k = self.top_k if top_k is None else self._check_top_k(top_k)
        weights, experts = probabilities.topk(k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(experts=experts, weights=weights, probabilities=probabilities)

    def route(self, features: torch.Tensor, top_k: int | None = None) -> Routing:
        """Probabilities, then top-k, for a batch of (image or text) features."""
        return self.select(self.probabilities(features), top_k)


def load_centroids(
    directory: Path, manifest: EnsembleManifest, tensor: str | None = None
) -> torch.Tensor:
    """The router's ``K x D`` centroids (or another ``tensor`` of their file, the center).

    Raises:
        NotFound: the file is not there.
        InvalidArgument: not a safetensors file, or no such tensor in it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec = manifest.router.centroids
    if spec is None:
        raise NotFound("router.centroids: this ensemble has no image router (text-only experts)")
    name = tensor or spec.tensor
    path = directory / spec.path
    if not path.is_file():
        raise NotFound(f"router.centroids.path: {spec.path} is not in {directory}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidArgument(
            f"router.centroids.path: {spec.path} is unreadable ({error})"
        ) from None
    if name not in tensors:
        raise InvalidArgument(
            f"router.centroids.{'tensor' if tensor is None else 'center_tensor'}: no tensor "
            f"{name!r} in {spec.path} (found {sorted(tensors)})"
        )
    return tensors[name]


def load_router(directory: Path, manifest: EnsembleManifest) -> Router:
    """The manifest's router: its centroids (and center), tau, top-k and present experts.

    Raises:
        NotFound, InvalidArgument: the centroids file is missing or does not fit the manifest.
    """
    spec = manifest.router
    if spec.centroids is None:  # experts trained on text only: no image router
        return Router(
            None, spec.tau, spec.top_k, num_experts=manifest.num_experts,
            available=manifest.present_experts,
        )  # fmt: skip
    center_tensor = spec.centroids.center_tensor
    try:
        return Router(
            load_centroids(directory, manifest),
            spec.tau,
            spec.top_k,
            num_experts=manifest.num_experts,
            available=manifest.present_experts,
            center=None
            if center_tensor is None
            else load_centroids(directory, manifest, center_tensor),
        )
    except InvalidArgument as error:
        raise InvalidArgument(f"{directory / spec.centroids.path}: {error}") from None


def open_image(image: Image.Image | str | Path) -> Image.Image:
    """An RGB image from a PIL image or a file.

    Raises:
        NotFound: no such file.
        InvalidArgument: the file is not a decodable image.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise NotFound(f"image {path}: no such file")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except Exception as error:  # PIL raises many kinds; every one means "not an image"
        raise InvalidArgument(
            f"image {path}: cannot decode it ({type(error).__name__}: {error})"
        ) from None
