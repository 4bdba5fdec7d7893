"""From an expert's shard manifest to batches of token ids, labels and pixels.

The shard manifest (``expert-<k>.json``) is read by :mod:`protocol.shard_manifest`, the one
parser the site agent and the coordinator share (``docs/formats.md``): ``expert``,
``num_experts`` (match-dense-steps needs it), ``dataset_samples``, then ``samples``, the data
set's own records (LLaVA JSON / InternVL JSONL lines)::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "image_sha256": "9f3c...", "conversations": [
        {"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
        {"from": "gpt", "value": "The bus is white and red."}]}

Every image is checked against its ``image_sha256`` before training starts. Each
conversation is rendered with the model's own chat template; labels are -100 everywhere except
the assistant turns (the loss is on answers only, as in LLaVA); ``<image>`` becomes an image part where the text had it, and the processor's
expansion (e.g. 576 ``<image>`` tokens, or ``<img>`` + 256 ``<IMG_CONTEXT>`` + ``</img>``) takes
its place. Samples longer than ``data.max_length`` are truncated (never through an image) and
counted. A ``{"text": ...}`` sample is plain language modelling: every token is a label.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from protocol.digests import file_sha256
from protocol.errors import AtollError, InvalidArgument, NotFound, VerificationFailed
from protocol.recipe import Architecture, DataSettings
from protocol.shard_manifest import (
    ShardManifest,
    image_path,
    load_shard_manifest,
    sample_images,
    sample_name,
    shard_images,
)

__all__ = [
    "IGNORE_INDEX",
    "ConversationEncoder",
    "DataStats",
    "EncodedSample",
    "ShardDataset",
    "ShardManifest",
    "build_dataset",
    "collate",
    "conversation_messages",
    "load_shard_manifest",
    "sample_images",
    "verify_images",
    "verify_shard",
]

IGNORE_INDEX = -100  # the label value transformers' cross-entropy skips
IMAGE_TAG = "<image>"  # how LLaVA and InternVL data mark where an image goes
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


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


def conversation_messages(
    sample: dict[str, Any], num_images: int, where: str, with_images: bool
) -> list[dict[str, Any]]:
    """A LLaVA/InternVL ``conversations`` list as chat-template messages.

    Each ``<image>`` tag becomes an image part at its place in the turn (the newline that
    separates it from the text goes with it: templates add their own). If the data has images
    but no tags, they go at the start of the first user turn, as LLaVA and InternVL do.

    Raises:
        InvalidArgument: unknown role, empty conversation, or tags that do not match images.
    """
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise InvalidArgument(f"{where}: conversations: expected a non-empty list of turns")
    messages: list[dict[str, Any]] = []
    tags = 0
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise InvalidArgument(f"{where}: conversations[{number}]: expected {{from, value}}")
        role = _ROLES.get(str(turn.get("from")))
        if role is None:
            raise InvalidArgument(
                f"{where}: conversations[{number}].from: expected one of "
                f"{sorted(_ROLES)}, got {turn.get('from')!r}"
            )
        pieces = turn["value"].split(IMAGE_TAG)
        tags += len(pieces) - 1
        parts: list[dict[str, Any]] = []
        for position, piece in enumerate(pieces):
            if position > 0:
                parts.append({"type": "image"})
                piece = piece.removeprefix("\n")
            if position < len(pieces) - 1:
                piece = piece.removesuffix("\n")
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    if tags == 0 and num_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise InvalidArgument(f"{where}: has images but no user turn to put them in")
        first_user["content"][:0] = [{"type": "image"}] * num_images
    elif tags != num_images:
        raise InvalidArgument(
            f"{where}: the conversation has {tags} {IMAGE_TAG} tags but {num_images} images"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidArgument(f"{where}: conversations: no assistant ('gpt') turn to learn from")
    if not with_images:
        # A text tokenizer's template expects plain strings.
        for message in messages:
            message["content"] = "".join(p["text"] for p in message["content"])
    return messages


@dataclass(frozen=True)
class EncodedSample:
    """A sample as token ids before image expansion, with what is needed to finish it.

    Attributes:
        input_ids: Token ids; each image is one placeholder id, expanded at batch time.
        label_mask: True where the token is a training target.
        images: Relative paths of the images kept (after truncation), in order.
        truncated: True if ``max_length`` cut the sample.
    """

    input_ids: np.ndarray
    label_mask: np.ndarray
    images: tuple[str, ...]
    truncated: bool


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


class ConversationEncoder:
    """Renders samples with the model's chat template and tokenizes them with label masks.

    Args:
        processor: The base model's processor (vision-language) or tokenizer (causal LM).
        architecture: The model family (decides whether images are possible).
        settings: The recipe's data section.
    """

    def __init__(self, processor: Any, architecture: Architecture, settings: DataSettings) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.multimodal = architecture is not Architecture.CAUSAL_LM
        self.max_length = settings.max_length
        self.image_kwargs: dict[str, Any] = {}
        self.image_expansion: list[int] = []
        self.image_token_id = -1
        if self.multimodal:
            if settings.dynamic_resolution:
                raise InvalidArgument(
                    "data.dynamic_resolution: true is not supported; every image must expand to "
                    "the same number of tokens (the paper turns it off)"
                )
            if architecture is Architecture.INTERNVL:
                self.image_kwargs = {"crop_to_patches": False}
            self.image_token_id = int(processor.image_token_id)
            self.image_expansion = self._expansion_of_one_image()

    def _expansion_of_one_image(self) -> list[int]:
        # With a fixed resolution every image expands the same way; ask the processor once.
        from PIL import Image

        probe = Image.new("RGB", (64, 48))
        ids = self.processor(
            text=[self.processor.image_token],
            images=[probe],
            add_special_tokens=False,
            **self.image_kwargs,
        )["input_ids"][0]
        return [int(i) for i in ids]

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        rendered = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return rendered if isinstance(rendered, str) else rendered[0]

    def _assistant_spans(
        self, messages: list[dict[str, Any]], where: str
    ) -> tuple[str, list[tuple[int, int]]]:
        text = self._render(messages, generation_prompt=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], generation_prompt=True) if index else ""
            through = self._render(messages[: index + 1], generation_prompt=False)
            if not (text.startswith(through) and through.startswith(prompt)):
                raise InvalidArgument(
                    f"{where}: the model's chat template does not render conversations turn by "
                    "turn (a prefix changed), so answer tokens cannot be located"
                )
            spans.append((len(prompt), len(through)))
        return text, spans

    def encode(self, sample: dict[str, Any], where: str) -> EncodedSample:
        """Tokenizes one sample and marks its training targets.

        Raises:
            InvalidArgument: the sample is malformed, or has images for a text-only model.
        """
        images = [path for path, _ in sample_images(sample, where)]
        if images and not self.multimodal:
            raise InvalidArgument(f"{where}: has images, but model.architecture is causal-lm")
        if "conversations" not in sample and isinstance(sample.get("text"), str):
            text, spans = sample["text"], [(0, len(sample["text"]))]
        else:
            messages = conversation_messages(sample, len(images), where, self.multimodal)
            text, spans = self._assistant_spans(messages, where)
        bos = self.tokenizer.bos_token
        # Templates that write the BOS token themselves must not get a second one.
        add_special = not (bos and text.startswith(bos))
        encoded = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        starts = np.asarray([start for start, end in encoded["offset_mapping"]], dtype=np.int64)
        ends = np.asarray([end for start, end in encoded["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for low, high in spans:
            mask |= (starts >= low) & (starts < high) & (ends > starts)
        if self.multimodal:
            placeholders = int((ids == self.image_token_id).sum())
            if placeholders != len(images):
                raise InvalidArgument(
                    f"{where}: the chat template rendered {placeholders} image placeholders for "
                    f"{len(images)} images"
                )
            mask &= ids != self.image_token_id
        return self._truncate(ids, mask, tuple(images))

    def expanded_length(self, ids: np.ndarray) -> int:
        """Length of ``ids`` once every image placeholder is expanded."""
        if not self.multimodal:
            return len(ids)
        placeholders = int((ids == self.image_token_id).sum())
        return len(ids) + placeholders * (len(self.image_expansion) - 1)

    def _truncate(
        self, ids: np.ndarray, mask: np.ndarray, images: tuple[str, ...]
    ) -> EncodedSample:
        if self.expanded_length(ids) <= self.max_length:
            return EncodedSample(ids, mask, images, truncated=False)
        # Walk the tokens, counting expanded length; stop before the token that does not fit.
        # An image either fits whole or is dropped with everything after it: a partial image
        # would not match the number of features the vision tower produces.
        # (A causal LM's image_token_id is -1, so every width is 1.)
        width = np.where(ids == self.image_token_id, len(self.image_expansion), 1)
        kept = int(np.searchsorted(np.cumsum(width), self.max_length, side="right"))
        kept_images = int((ids[:kept] == self.image_token_id).sum())
        return EncodedSample(ids[:kept], mask[:kept], images[:kept_images], truncated=True)

    def expand(self, ids: np.ndarray, mask: np.ndarray) -> tuple[list[int], list[int]]:
        """Input ids and labels with each image placeholder replaced by its expansion."""
        labels = np.where(mask, ids, IGNORE_INDEX)
        if not self.multimodal or not (ids == self.image_token_id).any():
            return ids.tolist(), labels.tolist()
        out_ids: list[int] = []
        out_labels: list[int] = []
        for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
            if token == self.image_token_id:
                out_ids.extend(self.image_expansion)
                out_labels.extend([IGNORE_INDEX] * len(self.image_expansion))
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels


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
