"""The router: probabilities, top-k, tau, validation, and features equal to the plan's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.router import Router
from ensemble.runtime import RoutedEnsemble
from protocol.errors import InvalidArgument
from protocol.feature_model import FeatureModel, load_encoder

from .builders import write_pictures


def _centroids(k: int = 4, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


def test_probabilities_sum_to_one_and_top_k_is_renormalised() -> None:
    router = Router(_centroids(), tau=5.0, top_k=2)
    features = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    probabilities = router.probabilities(features)
    assert probabilities.shape == (6, 4)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(6))
    routing = router.route(features)
    assert routing.experts.shape == routing.weights.shape == (6, 2)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(6))
    kept = probabilities.gather(1, routing.experts)
    torch.testing.assert_close(routing.weights, kept / kept.sum(-1, keepdim=True))
    # The kept experts are the most probable ones.
    assert (kept[:, 0] >= kept[:, 1]).all()
    assert (kept[:, 1:2] >= probabilities.topk(3).values[:, 2:3]).all()


def test_matches_the_formula() -> None:
    centroids, features = _centroids(), torch.randn(3, 8)
    router = Router(centroids, tau=7.0, top_k=1)
    cosine = torch.nn.functional.normalize(features, dim=-1) @ (
        torch.nn.functional.normalize(centroids, dim=-1).T
    )
    torch.testing.assert_close(router.probabilities(features), torch.softmax(7.0 * cosine, -1))


def test_tau_sharpens() -> None:
    features = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    peaks = [
        Router(_centroids(), tau, 1).probabilities(features).max(-1).values for tau in (1, 10, 100)
    ]
    assert (peaks[0] < peaks[1]).all() and (peaks[1] < peaks[2]).all()
    assert (peaks[2] > 0.99).all()


def test_partial_router_renormalises_over_present_experts() -> None:
    router = Router(_centroids(), tau=3.0, top_k=3, available=[0, 2, 3])
    probabilities = router.probabilities(torch.randn(4, 8))
    assert (probabilities[:, 1] == 0).all()
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4))
    with pytest.raises(InvalidArgument, match=r"top_k: expected an integer in 1\.\.3"):
        router.route(torch.randn(1, 8), top_k=4)


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan, math.inf])
def test_bad_tau(tau: float) -> None:
    with pytest.raises(InvalidArgument, match="tau: expected a finite number > 0"):
        Router(_centroids(), tau=tau, top_k=1)


@pytest.mark.parametrize("top_k", [0, 5, -1, True])
def test_top_k_out_of_range(top_k: int) -> None:
    with pytest.raises(InvalidArgument, match=r"top_k: expected an integer in 1\.\.4"):
        Router(_centroids(), tau=1.0, top_k=top_k)


def test_centroid_count_and_shape() -> None:
    with pytest.raises(InvalidArgument, match="3 centroids for 2 experts"):
        Router(_centroids(3), tau=1.0, top_k=1, num_experts=2)
    with pytest.raises(InvalidArgument, match=r"expected a \(K, D\) matrix"):
        Router(torch.zeros(4), tau=1.0, top_k=1)
    with pytest.raises(InvalidArgument, match="non-zero rows"):
        Router(torch.zeros(2, 3), tau=1.0, top_k=1)
    with pytest.raises(InvalidArgument, match=r"features: expected \(B, 8\)"):
        Router(_centroids(), tau=1.0, top_k=1).probabilities(torch.zeros(2, 5))


def test_features_equal_the_partitioners(ensemble: RoutedEnsemble, tmp_path: Path) -> None:
    """The router must see an image exactly as the plan did, or it routes elsewhere: both
    are the one feature model, loaded from the plan's spec or from the ensemble's files."""
    files = [p for paths in write_pictures(tmp_path, per_kind=3).values() for p in paths]
    partitioner = load_encoder("open_clip:atoll-tiny-clip", device="cpu")
    assert type(partitioner) is type(ensemble.feature_model) is FeatureModel
    expected, failures = partitioner.encode(files)
    assert not failures
    from PIL import Image

    actual = ensemble.feature_model.encode_images([Image.open(p) for p in files])
    np.testing.assert_array_equal(actual.numpy(), expected)


def test_images_route_to_their_cluster(ensemble: RoutedEnsemble) -> None:
    from .builders import picture

    routing = ensemble.route_images([picture("red-square", 3), picture("blue-circle", 3)])
    assert routing.experts[:, 0].tolist() == [0, 1]
    assert (routing.probabilities.max(-1).values > 0.9).all()


def test_text_features_are_unit_vectors(ensemble: RoutedEnsemble) -> None:
    features = ensemble.feature_model.encode_texts(["a red square", "a blue circle"])
    assert features.shape == (2, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))


def test_center_is_subtracted_before_the_cosine() -> None:
    centroids, features = _centroids(), torch.randn(3, 8)
    center = 0.3 * torch.ones(8)
    router = Router(centroids, tau=7.0, top_k=1, center=center)
    unit = torch.nn.functional.normalize(features, dim=-1)
    centred = torch.nn.functional.normalize(unit - center, dim=-1)
    cosine = centred @ torch.nn.functional.normalize(centroids, dim=-1).T
    torch.testing.assert_close(router.cosines(features), cosine)
    torch.testing.assert_close(router.probabilities(features), torch.softmax(7.0 * cosine, -1))
    # Scaling a feature changes nothing: the centre applies to the unit feature, as the
    # partitioner subtracted it from unit features.
    torch.testing.assert_close(router.cosines(5 * features), cosine)
    with pytest.raises(InvalidArgument, match=r"router center: expected 8 finite numbers"):
        Router(centroids, tau=1.0, top_k=1, center=torch.ones(3))


def test_a_router_without_centroids_routes_no_image() -> None:
    router = Router(None, tau=1.0, top_k=2, num_experts=3, available=[0, 2])
    assert router.num_experts == 3 and router.num_available == 2
    with pytest.raises(InvalidArgument, match="no image router: its experts were trained on text"):
        router.route(torch.randn(1, 8))
    with pytest.raises(InvalidArgument, match="without centroids, num_experts is required"):
        Router(None, tau=1.0, top_k=1)
