"""Encoders (real open_clip and Hugging Face CLIP, random weights), the cache, --features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coordinator.partition.features import FeatureCache, load_features_file
from protocol.ensemble_manifest import EncoderSpec
from protocol.errors import InvalidArgument, NotFound
from protocol.feature_model import TINY_MODEL, load_encoder, load_feature_model

from .builders import make_images


def test_open_clip_tiny_encoder_is_deterministic_and_unit_norm(tmp_path: Path) -> None:
    names = make_images(tmp_path, 5)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths = [tmp_path / n for n in names] + [tmp_path / "broken.png"]
    encoder = load_encoder(f"open_clip:{TINY_MODEL}", device="cpu")
    features, failures = encoder.encode(paths, batch_size=2)
    assert features.shape == (6, 32) and features.dtype == np.float32
    assert np.allclose(np.linalg.norm(features[:5], axis=1), 1, atol=1e-5)
    assert [f.path.name for f in failures] == ["broken.png"]
    assert not features[5].any()
    again, _ = load_encoder(f"open_clip:{TINY_MODEL}", device="cpu").encode(paths[:5])
    assert np.allclose(again, features[:5], atol=1e-6)
    identity = encoder.identity
    assert identity["model"] == TINY_MODEL and identity["weights"] == {"random_init_seed": 0}
    assert identity["dim"] == 32


def test_encoder_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="expected 'open_clip:MODEL'"):
        load_encoder("clip")
    with pytest.raises(InvalidArgument, match="unknown open_clip model"):
        load_encoder("open_clip:no-such-model")
    with pytest.raises(NotFound, match="no such weights file"):
        load_encoder(f"open_clip:{TINY_MODEL}:{tmp_path}/missing.bin")
    with pytest.raises(NotFound, match=r"no config\.json"):
        load_encoder(f"hf:{tmp_path}")


def test_hugging_face_clip_from_a_local_folder(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            # The tokenizer below: CLIP pools the text at its end-of-text token.
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=12,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path / "clip")
    names = make_images(tmp_path / "data", 3)
    encoder = load_encoder(f"hf:{tmp_path / 'clip'}", device="cpu")
    features, failures = encoder.encode([tmp_path / "data" / n for n in names])
    assert features.shape == (3, 12) and not failures
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    assert encoder.identity["backend"] == "hf" and encoder.identity["dim"] == 12
    # The router loads the same folder from an ensemble's manifest and sees the same features.
    spec = EncoderSpec(
        backend="hf",
        model="clip",
        directory="clip",
        dim=12,
        image_size=32,
        identity=encoder.identity,
    )
    router_model = load_feature_model(spec, tmp_path, device="cpu")
    images = [Image.open(tmp_path / "data" / n) for n in names]
    np.testing.assert_array_equal(router_model.encode_images(images).numpy(), features)
    assert router_model.clip is not None  # the runtime may share this tower with LLaVA
    with pytest.raises(InvalidArgument, match="has no text tower"):
        router_model.encode_texts(["no tokenizer was saved"])
    # With a vocabulary saved beside it, the folder has a text tower (the clip-text strategy).
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(
        tmp_path / "clip"
    )
    texts = load_feature_model(spec, tmp_path, device="cpu").encode_texts(["a", "b"])
    assert texts.shape == (2, 12) and not torch.allclose(texts[0], texts[1])


def test_feature_cache_round_trip(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, {"backend": "x", "dim": 2})
    assert cache.load({"a"}) == {}
    cache.add(["a", "b"], np.array([[1, 0], [0, 1]], np.float32))
    cache.add(["c"], np.array([[0.6, 0.8]], np.float32))
    found = cache.load({"a", "c"})
    assert sorted(found) == ["a", "c"] and np.allclose(found["c"], [0.6, 0.8])
    (cache.directory / "shard-garbage.npz").write_bytes(b"junk")  # a torn shard is a miss
    assert sorted(cache.load({"a", "b"})) == ["a", "b"]
    assert FeatureCache(tmp_path, {"backend": "y", "dim": 2}).load({"a"}) == {}


def test_features_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    np.savez(
        path, ids=np.array(["a.png", "b.png"]), features=np.array([[3, 4], [0, 2]], np.float32)
    )
    by_ref, identity = load_features_file(path, ["b.png", "a.png"])
    assert np.allclose(by_ref["a.png"], [0.6, 0.8]) and identity["dim"] == 2
    with pytest.raises(
        InvalidArgument,
        match=r"ids do not match the data set: no features for 1 image\(s\): 'c.png'",
    ):
        load_features_file(path, ["a.png", "c.png"])
    np.savez(path, ids=np.array(["a", "a"]), features=np.ones((2, 2)))
    with pytest.raises(InvalidArgument, match=r"ids\[1\]: duplicate id 'a' \(also ids\[0\]\)"):
        load_features_file(path, ["a"])
    np.savez(path, ids=np.array(["a", "b"]), features=np.ones((3, 2)))
    with pytest.raises(InvalidArgument, match=r"expected a float array of shape \(2, D\)"):
        load_features_file(path, ["a"])
    np.savez(path, ids=np.array(["a"]), features=np.zeros((1, 2)))
    with pytest.raises(InvalidArgument, match=r"features\[0\] \(id 'a'\) is all zeros"):
        load_features_file(path, ["a"])
    np.savez(path, names=np.array(["a"]))
    with pytest.raises(InvalidArgument, match="expected arrays 'ids' and 'features'"):
        load_features_file(path, ["a"])
    with pytest.raises(NotFound):
        load_features_file(tmp_path / "none.npz", ["a"])
