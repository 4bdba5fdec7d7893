"""Shard data: manifests and image digests checked before use, conversations rendered with the
model's chat template, labels only on answers, images expanded, truncation counted."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from protocol.errors import InvalidArgument, NotFound, VerificationFailed
from protocol.recipe import Architecture, DataSettings, ModelSettings
from site_agent.training.conversation import IGNORE_INDEX, ConversationEncoder
from site_agent.training.data import (
    build_dataset,
    collate,
    load_shard_manifest,
    verify_shard,
)
from site_agent.training.model import load_processor

from .synthetic import Shard, write_shard

VLM = [Architecture.LLAVA, Architecture.INTERNVL]


@cache
def _processor(architecture: Architecture) -> Any:
    return load_processor(ModelSettings(architecture=architecture, base="init-from-config"), None)


def _encoder(architecture: Architecture, max_length: int = 512) -> ConversationEncoder:
    return ConversationEncoder(
        _processor(architecture), architecture, DataSettings(max_length=max_length)
    )


def _labelled_text(encoder: ConversationEncoder, ids: np.ndarray, mask: np.ndarray) -> str:
    return str(encoder.tokenizer.decode(ids[mask].tolist()))


SAMPLE = {
    "id": "q1",
    "image": "a.png",
    "image_sha256": "0" * 64,
    "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes, red."},
    ],
}


@pytest.mark.parametrize("architecture", VLM)
def test_labels_cover_the_assistant_turns_only(architecture: Architecture) -> None:
    encoder = _encoder(architecture)
    encoded = encoder.encode(SAMPLE, "s")
    labelled = _labelled_text(encoder, encoded.input_ids, encoded.label_mask)
    eos = encoder.tokenizer.eos_token
    assert labelled.startswith("Red." + eos)
    assert "Yes, red." + eos in labelled
    assert "What colour" not in labelled and "Sure?" not in labelled
    assert "USER" not in labelled and "user" not in labelled


@pytest.mark.parametrize("architecture", VLM)
def test_image_placeholder_expands_to_the_processor_tokens(architecture: Architecture) -> None:
    encoder = _encoder(architecture)
    encoded = encoder.encode(SAMPLE, "s")
    ids, labels = encoder.expand(encoded.input_ids, encoded.label_mask)
    image_token = encoder.processor.image_token_id
    # The tiny vision tower sees 32x32 pixels in 8x8 patches: 16 features for LLaVA, 4 after
    # InternVL's 2x2 pixel shuffle (framed by <img> and </img>).
    expected = 16 if architecture is Architecture.LLAVA else 4
    assert ids.count(image_token) == expected
    assert len(ids) == len(labels) == encoder.expanded_length(encoded.input_ids)
    assert all(
        label == IGNORE_INDEX
        for token, label in zip(ids, labels, strict=True)
        if token == image_token
    )
    if architecture is Architecture.INTERNVL:
        tokenizer = encoder.tokenizer
        start, end = tokenizer.start_image_token_id, tokenizer.end_image_token_id
        assert ids[ids.index(start) + expected + 1] == end


def test_image_tag_keeps_its_place_in_the_turn() -> None:
    encoder = _encoder(Architecture.INTERNVL)
    sample = {
        **SAMPLE,
        "conversations": [
            {"from": "human", "value": "Look at this:\n<image>"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    text = encoder.tokenizer.decode(encoder.encode(sample, "s").input_ids.tolist())
    assert text.index("Look at this:") < text.index("<IMG_CONTEXT>")


def test_images_without_tags_go_first_and_wrong_tag_counts_are_named() -> None:
    encoder = _encoder(Architecture.LLAVA)
    untagged = {
        **SAMPLE,
        "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}],
    }
    text = encoder.tokenizer.decode(encoder.encode(untagged, "s").input_ids.tolist())
    assert text.index("<image>") < text.index("Colour?")
    two_tags = {
        **SAMPLE,
        "conversations": [
            {"from": "human", "value": "<image><image>"},
            {"from": "gpt", "value": "x"},
        ],
    }
    with pytest.raises(InvalidArgument, match="2 <image> tags but 1 images"):
        encoder.encode(two_tags, "sample q1")


def test_malformed_conversations_are_named() -> None:
    encoder = _encoder(Architecture.LLAVA)
    with pytest.raises(InvalidArgument, match=r"conversations\[1\]\.from: expected one of"):
        encoder.encode(
            {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}, "s"
        )
    with pytest.raises(InvalidArgument, match="no assistant"):
        encoder.encode({"conversations": [{"from": "human", "value": "a"}]}, "s")
    with pytest.raises(InvalidArgument, match="non-empty list"):
        encoder.encode({"id": "x"}, "s")


def test_truncation_never_cuts_through_an_image() -> None:
    encoder = _encoder(Architecture.LLAVA, max_length=12)
    # "<s>USER: " is 9 tokens, then the image needs 16: it cannot fit, so it is dropped whole.
    encoded = encoder.encode(SAMPLE, "s")
    assert encoded.truncated and encoded.images == ()
    assert encoder.image_token_id not in encoded.input_ids.tolist()
    assert not encoded.label_mask.any()


def test_truncation_keeps_whole_images_and_counts(tmp_path: Path) -> None:
    # Image samples are 73-118 tokens long, their first answer starts at token 61; text-only
    # samples are 37 long with the answer from token 29.
    shard = write_shard(tmp_path, image_samples=6, text_samples=2)
    processor = _processor(Architecture.LLAVA)
    manifest = load_shard_manifest(shard.manifest)
    dataset, stats = build_dataset(
        manifest, shard.image_root, processor, Architecture.LLAVA, DataSettings(max_length=90)
    )
    assert (stats.samples, stats.truncated_samples, stats.dropped_samples) == (8, 2, 0)
    for sample in dataset.samples:
        assert encoder_length(dataset, sample) <= 90
        assert len(sample.images) == int((sample.input_ids == processor.image_token_id).sum())
    short_dataset, short_stats = build_dataset(
        manifest, shard.image_root, processor, Architecture.LLAVA, DataSettings(max_length=40)
    )
    # At 40 tokens no image sample reaches its answer: dropped and counted, text ones stay.
    assert (short_stats.truncated_samples, short_stats.dropped_samples) == (6, 6)
    assert len(short_dataset) == 2 and short_stats.text_only_samples == 2
    assert short_stats.dropped[0] == "samples[0] (id 'img-0')"


def encoder_length(dataset: Any, sample: Any) -> int:
    return int(dataset.encoder.expanded_length(sample.input_ids))


def test_text_only_and_image_samples_batch_together(shard: Shard) -> None:
    processor = _processor(Architecture.LLAVA)
    dataset, stats = build_dataset(
        load_shard_manifest(shard.manifest),
        shard.image_root,
        processor,
        Architecture.LLAVA,
        DataSettings(),
    )
    assert (stats.image_samples, stats.text_only_samples, stats.images) == (24, 8, 24)
    image_item, text_item = dataset[0], dataset[len(dataset) - 1]
    assert image_item["pixel_values"].shape == (1, 3, 32, 32)
    assert "pixel_values" not in text_item
    batch = collate([image_item, text_item], pad_token_id=processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 1
    padded = batch["attention_mask"] == 0
    assert bool((batch["labels"][padded] == IGNORE_INDEX).all())
    assert batch["input_ids"].dtype == torch.long


def test_plain_text_documents_train_on_every_token() -> None:
    encoder = _encoder(Architecture.CAUSAL_LM)
    encoded = encoder.encode({"text": "3 plus 4 is 7."}, "s")
    assert encoded.label_mask.all()
    with pytest.raises(InvalidArgument, match="causal-lm"):
        encoder.encode(SAMPLE, "s")


def test_missing_image_is_named(shard: Shard) -> None:
    (shard.image_root / "img-005.png").unlink()
    with pytest.raises(NotFound, match=r"id 'img-5'.*'img-005\.png' not found"):
        verify_shard(load_shard_manifest(shard.manifest), shard.image_root)


def test_digest_mismatch_shows_expected_and_actual(shard: Shard) -> None:
    (shard.image_root / "img-003.png").write_bytes(b"not the image")
    with pytest.raises(
        VerificationFailed,
        match=r"img-003\.png'. expected sha256 [0-9a-f]{16}\.\., got [0-9a-f]{16}",
    ):
        verify_shard(load_shard_manifest(shard.manifest), shard.image_root)


def test_image_fields_must_be_well_formed(tmp_path: Path, shard: Shard) -> None:
    document = json.loads(shard.manifest.read_text())
    del document["samples"][0]["image_sha256"]
    bad = tmp_path / "expert-1.json"
    bad.write_text(json.dumps(document))
    with pytest.raises(
        InvalidArgument, match=r"samples\[0\] \(id 'img-0'\): image_sha256: expected one sha256"
    ):
        verify_shard(load_shard_manifest(bad), shard.image_root)
    document["samples"][0]["image_sha256"] = "0" * 64
    document["samples"][0]["image"] = "../outside.png"
    bad.write_text(json.dumps(document))
    with pytest.raises(InvalidArgument, match="outside the image root"):
        verify_shard(load_shard_manifest(bad), shard.image_root)
    with pytest.raises(InvalidArgument, match="--image-root"):
        verify_shard(load_shard_manifest(shard.manifest), None)


def test_manifest_shape_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "expert-0.json"
    with pytest.raises(NotFound):
        load_shard_manifest(path)
    path.write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        load_shard_manifest(path)
    path.write_text(json.dumps({"samples": {"a": 1}}))
    with pytest.raises(InvalidArgument, match="'samples' list"):
        load_shard_manifest(path)
    path.write_text(json.dumps({"samples": [], "num_experts": "two"}))
    with pytest.raises(InvalidArgument, match="num_experts: expected a non-negative integer"):
        load_shard_manifest(path)
    path.write_text(json.dumps([{"id": "a", "text": "x"}]))
    assert load_shard_manifest(path).num_experts is None
