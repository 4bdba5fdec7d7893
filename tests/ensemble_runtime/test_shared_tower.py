"""The router shares the LLaVA experts' CLIP vision tower when it is the same model: one
tower pass per batch serves routing and the experts, and the answers are the unshared ones."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ensemble.runtime import RoutedEnsemble
from protocol.ensemble_manifest import expert_path

from .builders import build_ensemble, picture
from .test_batching import counting_forwards
from .test_generate import PROMPT, _own_generate


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """K=2 tiny LLaVA experts with one frozen vision tower; the router is CLIP on that tower."""
    root = tmp_path_factory.mktemp("shared")
    return build_ensemble(root / "ensemble", scratch=root / "pictures", shared_encoder=True)


@pytest.fixture(scope="module")
def shared(shared_dir: Path) -> RoutedEnsemble:
    return RoutedEnsemble.from_pretrained(shared_dir, verify=True, device="cpu")


def _towers(ensemble: RoutedEnsemble) -> list[nn.Module]:
    """Every CLIP vision model in the ensemble: the router's and each expert's tower."""
    models = [ensemble.feature_model.clip.vision_model, *ensemble.experts.engines()]
    towers = {}
    for model in models:
        for module in model.modules():
            if type(module).__name__ == "CLIPVisionModel":
                towers[id(module)] = module
    return list(towers.values())


def _tower_passes(ensemble: RoutedEnsemble) -> list[nn.Module]:
    """What runs in a pass through any tower: its transformer layers. A handed-back output
    calls a tower without a pass."""
    return [tower.encoder for tower in _towers(ensemble)]


@contextmanager
def _unshared(ensemble: RoutedEnsemble) -> Iterator[None]:
    tower, ensemble.shared_tower = ensemble.shared_tower, None
    try:
        yield
    finally:
        ensemble.shared_tower = tower


IMAGES = [picture("red-square", 1), picture("blue-circle", 2), picture("red-square", 3)]


def test_the_tower_is_shared_only_when_it_is_the_same_model(
    shared: RoutedEnsemble, ensemble: RoutedEnsemble
) -> None:
    assert shared.shared_tower is not None
    assert "one tower pass per batch" in shared.shared_tower_reason
    assert ensemble.shared_tower is None  # an open_clip router is another model
    assert ensemble.shared_tower_reason == "the router's encoder is not a Hugging Face CLIP"


@pytest.mark.parametrize("top_k", [1, 2])
def test_one_tower_pass_per_batch(shared: RoutedEnsemble, top_k: int) -> None:
    with counting_forwards(_tower_passes(shared)) as passes:
        result = shared.generate_tokens(IMAGES, [PROMPT] * 3, max_new_tokens=4, top_k=top_k)
    assert sum(passes) == 1
    assert [e[0] for e in result.experts] == [0, 1, 0]
    with _unshared(shared), counting_forwards(_tower_passes(shared)) as passes:
        shared.generate_tokens(IMAGES, [PROMPT] * 3, max_new_tokens=4, top_k=top_k)
    assert sum(passes) >= 2  # the router's encoder, then the experts' tower


@pytest.mark.parametrize("top_k", [1, 2])
def test_shared_answers_equal_unshared(shared: RoutedEnsemble, top_k: int) -> None:
    images = [*IMAGES, None]
    prompts = [PROMPT, PROMPT, "Describe it.", "Hello"]
    result = shared.generate_tokens(images, prompts, max_new_tokens=6, top_k=top_k)
    with _unshared(shared):
        expected = shared.generate_tokens(images, prompts, max_new_tokens=6, top_k=top_k)
    assert result.token_ids == expected.token_ids
    assert result.experts == expected.experts
    for a, b in zip(result.weights, expected.weights, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b))


def test_tower_passes_of_a_few_images_at_a_time(shared: RoutedEnsemble) -> None:
    images = [*IMAGES, None]
    prompts = [PROMPT, PROMPT, "Describe it.", "Hello"]
    expected = shared.generate_tokens(images, prompts, max_new_tokens=6)
    with counting_forwards(_tower_passes(shared)) as passes:
        result = shared.generate_tokens(images, prompts, max_new_tokens=6, batch_size=2)
    assert sum(passes) == 2  # three images, two at a time; none again for the experts
    assert result.token_ids == expected.token_ids and result.experts == expected.experts
    pixels = shared.processor.image_processor(images=IMAGES, return_tensors="pt")
    assert shared.shared_tower is not None
    whole, output = shared.shared_tower.encode(pixels["pixel_values"])
    parts, joined = shared.shared_tower.encode(pixels["pixel_values"], 2)
    torch.testing.assert_close(parts, whole)
    layer = shared.shared_tower.feature_layer
    torch.testing.assert_close(joined.hidden_states[layer], output.hidden_states[layer])
    assert joined.hidden_states[layer].shape[0] == len(IMAGES)


def test_routing_features_are_the_routers_own(shared: RoutedEnsemble) -> None:
    own = shared.feature_model.encode_images(IMAGES)
    pixels = shared.processor.image_processor(images=IMAGES, return_tensors="pt")
    assert shared.shared_tower is not None
    features, _ = shared.shared_tower.encode(pixels["pixel_values"])
    torch.testing.assert_close(features, own)


def test_shared_top1_equals_the_experts_own_generate(
    shared: RoutedEnsemble, shared_dir: Path
) -> None:
    result = shared.generate_tokens(IMAGES, [PROMPT] * 3, max_new_tokens=8)
    own_red = _own_generate(shared_dir / expert_path(0), [IMAGES[0], IMAGES[2]], 8)
    own_blue = _own_generate(shared_dir / expert_path(1), [IMAGES[1]], 8)
    assert result.token_ids == [own_red[0], own_blue[0], own_red[1]]


def test_another_tower_is_not_shared(shared_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(shared_dir, tmp_path / "copy"))
    weights = copy / "router" / "encoder" / "model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if n.startswith("vision_model.post_layernorm.weight"))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    ensemble = RoutedEnsemble.from_pretrained(copy, verify=False, device="cpu")
    assert ensemble.shared_tower is None
    assert ensemble.shared_tower_reason == (
        f"weight {name.removeprefix('vision_model.')} differs between the router's CLIP and "
        "the experts"
    )
    result = ensemble.generate_tokens(IMAGES[:1], [PROMPT], max_new_tokens=3)
    assert len(result.experts) == 1
