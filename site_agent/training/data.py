"""From an expert's shard manifest to batches of token ids, labels and pixels.

The shard manifest (``expert-<k>.json``) is read by :mod:`protocol.shard_manifest`, the one
parser the site agent and the coordinator share (``docs/formats.md``): ``expert``,
``num_experts`` (match-dense-steps needs it), ``dataset_samples``, then ``samples``, the data
set's own records (LLaVA JSON / InternVL JSONL lines)::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "image_sha256": "9f3c...", "conversations": [
        {"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
        {"from": "gpt", "value": "The bus is white and red."}]}

Every image is checked against its ``image_sha256`` before training starts. Each sample is
encoded by :class:`~site_agent.training.conversation.ConversationEncoder`; images are read
when a sample is fetched, and :func:`collate` pads a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from protocol.digests import file_sha256
from protocol.errors import AtollError, InvalidArgument, NotFound, VerificationFailed
from protocol.recipe import Architecture, DataSettings
from protocol.shard_manifest import (
    ShardManifest,
    image_path,
    load_shard_manifest,
    sample_name,
    shard_images,
)
from site_agent.training.conversation import IGNORE_INDEX, ConversationEncoder, EncodedSample

__all__ = [
    "DataStats",
    "ShardDataset",
    "ShardManifest",
    "build_dataset",
    "collate",
    "load_shard_manifest",
    "verify_images",
    "verify_shard",
]


def verify_images(manifest: ShardManifest, image_root: Path, workers: int = 8) -> int:
    """Checks that every image of the shard exists under ``image_root`` with its sha256.

    Runs before training so that a bad shard fails in seconds, not hours in.

    Returns:
        The number of distinct images checked.

    Raises:
        NotFound: an image (or the image root) is missing.
        VerificationFailed: an image's bytes differ from its recorded sha256.
        InvalidArgument: a sample's image fields are malformed, or two samples give the same
            image different digests.
    """
    if not image_root.is_dir():
        raise NotFound(f"image root {image_root}: no such directory")
    expected = shard_images(manifest)

    def check(item: tuple[str, tuple[str, str]]) -> AtollError | None:
        relative, (digest, where) = item
        path = image_path(image_root, relative, where)
        if not path.is_file():
            return NotFound(f"{where}: image {relative!r} not found under {image_root}")
        actual = file_sha256(path)
        if actual != digest:
            return VerificationFailed(
                f"{where}: image {relative!r}: expected sha256 {digest[:16]}.., got {actual[:16]}.."
            )
        return None

    # sha256 releases the GIL, so threads read and hash several files at once.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for p in pool.map(check, sorted(expected.items())) if p is not None]
    if problems:
        # A changed image is the graver finding (tampering or corruption): report it first.
        problems.sort(key=lambda problem: not isinstance(problem, VerificationFailed))
        first = problems[0]
        if len(problems) > 1:
            raise type(first)(f"{first} (and {len(problems) - 1} more image problems)")
        raise first
    return len(expected)


@dataclass
class DataStats:
    """What preparing the shard found (recorded in ``run.json``)."""

    samples: int = 0
    image_samples: int = 0
    text_only_samples: int = 0
    images: int = 0
    truncated_samples: int = 0
    dropped_samples: int = 0  # truncation left no assistant token to learn from
    tokens: int = 0  # after image expansion and truncation
    label_tokens: int = 0
    dropped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The statistics as a JSON-ready mapping (the dropped list shortened)."""
        record = asdict(self)
        record["dropped"] = self.dropped[:20]
        return record


class ShardDataset(Dataset[dict[str, Any]]):
    """Encoded samples; images are read and preprocessed when a sample is fetched.

    Args:
        encoder: The encoder that produced ``samples`` (expands images, processes pixels).
        samples: Encoded samples, in shard order.
        image_root: Directory the samples' image paths are relative to.
    """

    def __init__(
        self, encoder: ConversationEncoder, samples: Sequence[EncodedSample], image_root: Path
    ) -> None:
        self.encoder = encoder
        self.samples = list(samples)
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        input_ids, labels = self.encoder.expand(sample.input_ids, sample.label_mask)
        item: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
        if sample.images:
            from PIL import Image

            pictures = []
            for relative in sample.images:
                with Image.open(self.image_root / relative) as picture:
                    pictures.append(picture.convert("RGB"))
            pixels = self.encoder.processor.image_processor(
                pictures, return_tensors="pt", **self.encoder.image_kwargs
            )["pixel_values"]
            item["pixel_values"] = pixels
        return item


def collate(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pads a list of samples to the longest one (right padding, labels -100)."""
    longest = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        input_ids[row, :length] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels, dim=0)
    return batch


def verify_shard(manifest: ShardManifest, image_root: Path | None, workers: int = 8) -> int:
    """Checks the shard's images before anything else is built (see :func:`verify_images`).

    Returns:
        The number of distinct images checked (0 for a text-only shard).

    Raises:
        InvalidArgument: the shard has images but no image root was given.
        NotFound, VerificationFailed: as :func:`verify_images`.
    """
    if not any("image" in sample for sample in manifest.samples):
        return 0
    if image_root is None:
        raise InvalidArgument(
            f"shard manifest {manifest.path.name}: samples have images; pass --image-root DIR"
        )
    return verify_images(manifest, image_root, workers)


def build_dataset(
    manifest: ShardManifest,
    image_root: Path | None,
    processor: Any,
    architecture: Architecture,
    settings: DataSettings,
) -> tuple[ShardDataset, DataStats]:
    """Encodes every sample of a shard whose images :func:`verify_shard` has checked.

    Args:
        manifest: The expert's shard.
        image_root: Directory the image paths are relative to (None for a text-only shard).
        processor: The base model's processor or tokenizer.
        architecture: The model family.
        settings: The recipe's data section.

    Returns:
        The dataset and what was found (counts of truncated and dropped samples, tokens...).

    Raises:
        InvalidArgument: a malformed sample, named by its index and id.
    """
    encoder = ConversationEncoder(processor, architecture, settings)
    stats = DataStats()
    kept: list[EncodedSample] = []
    for index, sample in enumerate(manifest.samples):
        name = sample_name(sample, index)
        encoded = encoder.encode(sample, f"shard manifest {manifest.path.name}: {name}")
        stats.samples += 1
        if encoded.truncated:
            stats.truncated_samples += 1
        if not encoded.label_mask.any():
            stats.dropped_samples += 1
            stats.dropped.append(name)
            continue
        kept.append(encoded)
        stats.image_samples += bool(encoded.images)
        stats.text_only_samples += not encoded.images
        stats.images += len(encoded.images)
        stats.tokens += encoder.expanded_length(encoded.input_ids)
        stats.label_tokens += int(encoded.label_mask.sum())
    return ShardDataset(encoder, kept, image_root or Path(".")), stats
