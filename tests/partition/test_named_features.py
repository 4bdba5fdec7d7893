"""Plans from features computed elsewhere name their encoder (and are spot-checked against
it when it loads here); ``hf:`` encoders must be CLIP folders; ``--center`` stores the mean."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from coordinator.partition.dataset import load_dataset, resolve_image
from coordinator.partition.plan_features import SPOT_CHECK_MIN_COSINE
from coordinator.state import StateDir
from ensemble.router import Router
from protocol.errors import InvalidArgument
from protocol.feature_model import TINY_MODEL, load_encoder, normalise_rows

from .test_plan import partition

TINY = f"open_clip:{TINY_MODEL}"


def _features(
    dataset: Path, root: Path, path: Path, encoder: str | None, noise: float = 0.0
) -> Path:
    """The tiny encoder's real features of every image (plus ``noise``), naming ``encoder``."""
    references = load_dataset(dataset).image_references
    encoded, failures = load_encoder(TINY, device="cpu").encode(
        [resolve_image(root, ref) for ref in references]
    )
    assert not failures
    encoded = encoded + noise * np.random.default_rng(1).standard_normal(encoded.shape)
    arrays: dict[str, Any] = {"ids": np.array(references), "features": encoded}
    if encoder is not None:
        arrays["encoder"] = np.array(encoder)
    np.savez(path, **arrays)
    return path


def _plan(state: StateDir) -> dict[str, Any]:
    return dict(json.loads((state.partition_dir / "plan.json").read_text()))


def test_features_file_names_its_encoder_and_is_spot_checked(
    state: StateDir, llava: tuple[Path, Path], tmp_path: Path
) -> None:
    dataset, root = llava
    named = _features(dataset, root, tmp_path / "named.npz", TINY)
    assert partition(state, dataset, root, "--experts", "2", "--features", str(named)) == 0
    plan = _plan(state)
    assert plan["encoder"]["backend"] == "open_clip" and plan["encoder_spec"] == TINY
    checked = plan["features"]["checked"]
    assert checked["images"] == 16 and checked["min_cosine"] > 0.999

    # Same features without the entry: --feature-encoder names the encoder instead.
    bare = _features(dataset, root, tmp_path / "bare.npz", None)
    flags = ("--experts", "2", "--features", str(bare))
    assert partition(state, dataset, root, *flags, "--feature-encoder", TINY) == 0
    assert _plan(state)["encoder"] == plan["encoder"]


def test_features_file_without_an_encoder_is_refused(
    state: StateDir, llava: tuple[Path, Path], tmp_path: Path
) -> None:
    dataset, root = llava
    bare = _features(dataset, root, tmp_path / "bare.npz", None)
    with pytest.raises(InvalidArgument, match=r"does not name the encoder.*--feature-encoder SPEC"):
        partition(state, dataset, root, "--experts", "2", "--features", str(bare))
    named = _features(dataset, root, tmp_path / "named.npz", TINY)
    with pytest.raises(InvalidArgument, match="names encoder 'open_clip:atoll-tiny-clip'"):
        partition(
            state, dataset, root, "--experts", "2", "--features", str(named),
            "--feature-encoder", "open_clip:ViT-B-16",
        )  # fmt: skip
    assert not state.partition_dir.exists()  # nothing written


def test_features_that_disagree_with_their_encoder_are_refused(
    state: StateDir, llava: tuple[Path, Path], tmp_path: Path
) -> None:
    dataset, root = llava
    noisy = _features(dataset, root, tmp_path / "noisy.npz", TINY, noise=0.5)
    with pytest.raises(
        InvalidArgument,
        match=rf"disagree with encoder 'open_clip:atoll-tiny-clip': \d+ of 16 images .* "
        rf"cosine below {SPOT_CHECK_MIN_COSINE}",
    ):
        partition(state, dataset, root, "--experts", "2", "--features", str(noisy))
    assert not state.partition_dir.exists()


def test_an_hf_folder_that_is_not_clip_is_refused(
    state: StateDir, llava: tuple[Path, Path], tmp_path: Path
) -> None:
    dataset, root = llava
    folder = tmp_path / "llava-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(InvalidArgument, match="model_type 'llava', expected 'clip'"):
        partition(state, dataset, root, "--experts", "2", "--encoder", f"hf:{folder}")


def test_center_is_the_default_and_stores_the_mean_feature(
    state: StateDir, llava: tuple[Path, Path]
) -> None:
    dataset, root = llava
    partition(state, dataset, root, "--experts", "2", "--encoder", TINY)
    plan = _plan(state)
    assert plan["center"] == {"tensor": "center", "images": plan["dataset"]["unique_images"] - 1}
    tensors = load_file(str(state.partition_dir / "centroids.safetensors"))
    assert tensors["center"].shape == (32,)
    # The stored centre is the mean of the unit features the plan clustered: one per image,
    # images 7 and 8 (one sample shows both) as their mean direction.
    names = [f"img/{i:04d}.png" for i in range(30)]
    encoded, _ = load_encoder(TINY, device="cpu").encode([root / n for n in names])
    pair = encoded[7] + encoded[8]
    units = [*np.delete(encoded, [7, 8], axis=0), pair / np.linalg.norm(pair)]
    np.testing.assert_allclose(tensors["center"], np.mean(units, axis=0), atol=1e-5)
    assert np.linalg.norm(tensors["center"]) > 0.5  # CLIP features share a large mean
    # The router subtracts the stored centre from a new image's feature as the plan did.
    router = Router(
        torch.from_numpy(tensors["centroids"]),
        tau=1.0,
        top_k=1,
        center=torch.from_numpy(tensors["center"]),
    )
    expected = normalise_rows(encoded - tensors["center"]) @ normalise_rows(tensors["centroids"]).T
    np.testing.assert_allclose(router.cosines(torch.from_numpy(encoded)), expected, atol=1e-5)
    partition(state, dataset, root, "--experts", "2", "--encoder", TINY, "--no-center")
    assert _plan(state)["center"] is None
    assert "center" not in load_file(str(state.partition_dir / "centroids.safetensors"))


def test_features_command_writes_a_file_partition_checks_and_reads(
    state: StateDir, llava: tuple[Path, Path], tmp_path: Path
) -> None:
    from coordinator.cli import main

    dataset, root = llava
    out = tmp_path / "elsewhere" / "features.npz"
    argv = ["features", "--dataset", str(dataset), "--image-root", str(root)]
    argv += ["--encoder", TINY, "--out", str(out), "--workers", "0", "--json"]
    assert main(argv) == 0
    with np.load(out) as data:
        assert str(data["encoder"]) == TINY
        assert sorted(data["ids"].tolist()) == sorted(set(load_dataset(dataset).image_references))
        assert np.allclose(np.linalg.norm(data["features"], axis=1), 1, atol=1e-5)
    assert partition(state, dataset, root, "--experts", "2", "--features", str(out)) == 0
    assert _plan(state)["features"]["checked"]["min_cosine"] > 0.999


def test_a_text_only_data_set_needs_no_encoder(
    state: StateDir, llava: tuple[Path, Path], tmp_path: Path
) -> None:
    dataset, root = llava
    with pytest.raises(InvalidArgument, match=r"image reference\(s\) to cluster: give --encoder"):
        partition(state, dataset, root, "--experts", "2")
    texts = [s for s in json.loads(dataset.read_text()) if "image" not in s]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    assert partition(state, tmp_path / "texts.json", root, "--experts", "2") == 0
    plan = _plan(state)
    assert plan["encoder"] is None and plan["algorithm"] == {"name": "random-equal", "images": 0}
    assert [c["text_only"] for c in plan["clusters"]] == [4, 3]
    assert not (state.partition_dir / "centroids.safetensors").exists()
    assert "centroids.safetensors" not in plan["files"]
