"""A LLaVA/InternVL conversation as token ids and a label mask, by the model's chat template.

Each conversation is rendered with the model's own chat template; labels are -100 everywhere
except the assistant turns (the loss is on answers only, as in LLaVA); ``<image>`` becomes an
image part where the text had it, and the processor's expansion (e.g. 576 ``<image>`` tokens, or ``<img>`` + 256 ``<IMG_CONTEXT>`` + ``</img>``) takes
its place. Samples longer than ``data.max_length`` are truncated (never through an image) and
counted. A ``{"text": ...}`` sample is plain language modelling: every token is a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import InvalidArgument
from protocol.recipe import Architecture, DataSettings
from protocol.shard_manifest import sample_images

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TAG",
    "ConversationEncoder",
    "EncodedSample",
    "conversation_messages",
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
