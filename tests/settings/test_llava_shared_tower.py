"""Setting 1 (paper §5.1): LLaVA experts trained with LoRA, routed by the Hugging Face CLIP
that is their own vision tower, K = 2 -- through the real commands. The router costs one
tower pass per batch; ``--fit-tau`` fits the temperature on held-out answers and the fit is
signed into the manifest; a tower that differs in one weight is not shared, and says why."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ensemble_runtime.builders import save_clip_router
from ensemble_runtime.test_batching import counting_forwards
from safetensors.torch import load_file, save_file

from ensemble.runtime import RoutedEnsemble
from protocol.ensemble_manifest import load_manifest
from protocol.exit_codes import ExitCode

from .harness import Federation, evaluate, generate, tiny_recipe

# A federation per module: its set-up (training included) counts toward the first test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
QUESTION = "What colour are the shapes?"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("llava-lora")
    federation = Federation(root / "federation", "llava-lora")
    # `coordinator recipe` materialises the tiny LLaVA base; its CLIP tower, saved as a
    # CLIPModel folder, plays openai/clip-vit-large-patch14-336 for LLaVA-1.5.
    federation.set_up(tiny_recipe(root / "llava-lora.yaml", "llava", lora=True))
    save_clip_router(root / "clip-tower", federation.state / "base")
    try:
        yield federation
    finally:
        federation.stop()


@pytest.fixture(scope="module")
def published(federation: Federation, data: Path) -> tuple[dict[str, Any], Path]:
    clip = federation.root.parent / "clip-tower"
    federation.partition("--dataset", str(data / "train.json"), "--image-root",
                         str(data / "images"), "--experts", "2", "--encoder", f"hf:{clip}")  # fmt: skip
    federation.train(2, data / "images")
    return federation.publish(
        "--fit-tau", str(data / "eval.json"), "--fit-image-root", str(data / "images")
    )


def test_hf_router_assembled_and_the_tower_shared(
    federation: Federation, data: Path, published: tuple[dict[str, Any], Path]
) -> None:
    _, ensemble_dir = published
    manifest = load_manifest(ensemble_dir)
    assert manifest.architecture == "llava" and manifest.base is not None
    assert [e.kind for e in manifest.experts] == ["lora", "lora"]
    encoder = manifest.router.encoder
    assert encoder.backend == "hf" and encoder.directory == "router/encoder/clip-tower"
    assert manifest.router.centroids.center_tensor == "center"

    answer = generate(federation, ensemble_dir, "--image", str(data / "images" / "shapes" /
                      "eval-0000.png"), "--prompt", QUESTION)  # fmt: skip
    assert len(answer["experts"]) == 1 and answer["weights"] == [1.0]
    report = evaluate(federation, ensemble_dir, data)
    assert {g["benchmark"] for g in report["groups"]} >= {"shapes", "charts"}

    ensemble = RoutedEnsemble.from_pretrained(ensemble_dir, verify=True, device="cpu")
    assert ensemble.shared_tower is not None, ensemble.shared_tower_reason
    images = sorted((data / "images" / "charts").glob("eval-*.png"))
    towers = [ensemble.feature_model.clip.vision_model.encoder]
    towers += [t.encoder for t in ensemble.experts.vision_towers()]
    with counting_forwards(towers) as passes:
        ensemble.generate_tokens(images, [QUESTION] * len(images), max_new_tokens=3)
    assert sum(passes) == 1  # one tower pass serves the router and the experts


def test_tau_fitted_on_held_out_answers_is_signed_in(
    federation: Federation, published: tuple[dict[str, Any], Path]
) -> None:
    result, ensemble_dir = published
    fit = load_manifest(ensemble_dir).router.tau_fit
    assert (
        fit is not None and fit.data_file == "eval.json" and fit.samples == 15
    )  # 3 pictures per domain, 3 and 2 questions each
    assert load_manifest(ensemble_dir).router.tau == pytest.approx(result["tau"])
    assert set(fit.compared) == {"1", "20", "50"}
    assert all(fit.log_likelihood >= value for value in fit.compared.values())
    assert fit.bounds[0] <= result["tau"] <= fit.bounds[1]


def test_fit_data_without_answers_or_images_is_refused(
    federation: Federation, data: Path, published: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    del published
    questions = json.loads((data / "eval.json").read_text())
    unanswered = [dict(q, conversations=q["conversations"][:1]) for q in questions]
    (tmp_path / "unanswered.json").write_text(json.dumps(unanswered))
    error = federation.coordinator("assemble", "--fit-tau", str(tmp_path / "unanswered.json"),
                                   "--fit-image-root", str(data / "images"),
                                   expect=ExitCode.BAD_INPUT)  # fmt: skip
    assert "expected reference answers" in error
    (tmp_path / "eval.json").write_text((data / "eval.json").read_text())
    error = federation.coordinator("assemble", "--fit-tau", str(tmp_path / "eval.json"),
                                   expect=ExitCode.NOT_FOUND)  # fmt: skip
    assert "not found under" in error


def test_a_tower_one_weight_apart_is_not_shared(
    published: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    _, ensemble_dir = published
    copy = Path(shutil.copytree(ensemble_dir, tmp_path / "copy"))
    weights = copy / "router" / "encoder" / "clip-tower" / "model.safetensors"
    tensors = load_file(weights)
    name = "vision_model.encoder.layers.0.mlp.fc1.bias"
    tensors[name][0] += 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    ensemble = RoutedEnsemble.from_pretrained(copy, verify=False, device="cpu")
    assert ensemble.shared_tower is None
    assert ensemble.shared_tower_reason == (
        "weight encoder.layers.0.mlp.fc1.bias differs between the router's CLIP and the experts"
    )
