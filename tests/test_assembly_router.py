"""Assembly of every kind of plan encoder: an ``hf:`` CLIP folder copied with digests (and
checked against the plan), a features plan that names no encoder refused with the fix, an
encoder recorded unchecked at partition time fixed at assembly, and the plan's mean feature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from assembly_helpers import join, sign_and_upload, write_plan
from safetensors.torch import load_file, save_file

from coordinator.assembly import AssemblyConfig, assemble
from ensemble.router import load_router
from protocol.digests import file_sha256
from protocol.encoder_files import hf_identity
from protocol.ensemble_manifest import load_manifest, verify_files
from protocol.errors import FailedPrecondition, VerificationFailed


def _clip_folder(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "vocab_size": 64}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


def _accepted_plan(running: Any, tmp: Path, **plan: Any) -> None:
    rng = np.random.default_rng(0)
    dim = plan.pop("dim", 32)
    write_plan(running, rng.standard_normal((2, dim)), [3, 3], **plan)
    for site in join(running, tmp, ["alpha", "beta"]):
        result = sign_and_upload(running, site, tmp / f"upload-{site.name}")
        assert result.accepted, result.reason
        site.client.close()


def test_hf_encoder_is_copied_with_digests_and_the_center_goes_along(
    running: Any, tmp_path: Path
) -> None:
    clip = _clip_folder(tmp_path / "clip-vit-tiny")
    center = np.full(12, 0.1)
    _accepted_plan(
        running,
        tmp_path,
        dim=12,
        encoder=hf_identity(clip),
        extra={"encoder_spec": f"hf:{clip}"},
        center=center,
    )
    result = assemble(running.state, running.coordinator.store, AssemblyConfig())
    manifest = load_manifest(result.directory)
    encoder = manifest.router.encoder
    assert encoder.backend == "hf" and encoder.directory == "router/encoder/clip-vit-tiny"
    assert sorted(encoder.files) == [
        f"router/encoder/clip-vit-tiny/{n}"
        for n in ("config.json", "model.safetensors", "preprocessor_config.json")
    ]
    verify_files(result.directory, manifest)
    assert manifest.router.centroids.center_tensor == "center"
    router = load_router(result.directory, manifest)
    assert router.center is not None
    np.testing.assert_allclose(router.center.numpy(), center, rtol=1e-6)


def test_hf_encoder_that_changed_since_the_plan_is_refused(running: Any, tmp_path: Path) -> None:
    clip = _clip_folder(tmp_path / "clip")
    _accepted_plan(
        running, tmp_path, dim=12, encoder=hf_identity(clip), extra={"encoder_spec": f"hf:{clip}"}
    )
    tensors = load_file(clip / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(clip / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerificationFailed, match="weights differs from the plan's encoder"):
        assemble(running.state, running.coordinator.store, AssemblyConfig())
    assert not running.state.ensembles_dir.exists() or not any(
        p.name.startswith("v") for p in running.state.ensembles_dir.iterdir()
    )


def test_a_features_plan_without_an_encoder_is_refused_with_the_fix(
    running: Any, tmp_path: Path
) -> None:
    old = {"backend": "features-file", "file": "f.npz", "sha256": "ab" * 32, "dim": 32}
    _accepted_plan(running, tmp_path, encoder=old)
    with pytest.raises(
        FailedPrecondition,
        match=r"does not name the encoder .* --features FILE\.npz --feature-encoder SPEC",
    ):
        assemble(running.state, running.coordinator.store, AssemblyConfig())


def test_an_encoder_unchecked_at_partition_is_fixed_from_the_folder_given(
    running: Any, tmp_path: Path
) -> None:
    clip = _clip_folder(tmp_path / "clip-vit-tiny")
    unchecked = {"backend": "hf", "model": "clip-vit-tiny", "dim": 12, "unchecked": True}
    spec = {"encoder_spec": "hf:/elsewhere/clip-vit-tiny"}
    _accepted_plan(running, tmp_path, dim=12, encoder=unchecked, extra=spec)
    with pytest.raises(FailedPrecondition, match="give its copy with --encoder-weights DIR"):
        assemble(running.state, running.coordinator.store, AssemblyConfig())
    config = AssemblyConfig(encoder_weights=clip)
    manifest = load_manifest(assemble(running.state, running.coordinator.store, config).directory)
    assert manifest.router.encoder.identity == hf_identity(clip)


def test_open_clip_weights_are_checked_as_they_are_copied(running: Any, tmp_path: Path) -> None:
    weights = tmp_path / "tiny.bin"
    weights.write_bytes(b"open_clip weights" * 1000)
    encoder = {
        "backend": "open_clip",
        "model": "atoll-tiny-clip",
        "weights": {"file": "tiny.bin", "sha256": file_sha256(weights)},
        "image_size": 32,
        "dim": 32,
    }
    _accepted_plan(running, tmp_path, encoder=encoder)
    store = running.coordinator.store
    other = tmp_path / "other.bin"
    other.write_bytes(b"other weights")
    with pytest.raises(VerificationFailed, match=r"other.bin: expected sha256 .* plan's encoder"):
        assemble(running.state, store, AssemblyConfig(encoder_weights=other))
    result = assemble(running.state, store, AssemblyConfig(encoder_weights=weights))
    manifest = load_manifest(result.directory)
    assert manifest.router.encoder.weights_file == "router/encoder/tiny.bin"
    assert manifest.router.encoder.files["router/encoder/tiny.bin"].sha256 == file_sha256(weights)
    verify_files(result.directory, manifest)
