"""The experts' processor: where an ensemble directory keeps it, and the chat prompt it
formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protocol.ensemble_manifest import EnsembleManifest
from protocol.errors import InvalidArgument

__all__ = ["chat_prompt", "load_processor"]


def chat_prompt(processor: Any, prompt: str, has_image: bool) -> str:
    """``prompt`` as one user turn (after an image placeholder when there is an image) in the
    processor's chat template, ready for generation."""
    content: list[dict[str, str]] = [{"type": "text", "text": prompt}]
    if has_image:
        content.insert(0, {"type": "image"})
    text: str = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return text


def load_processor(directory: Path, manifest: EnsembleManifest) -> Any:
    """The experts' processor (a tokenizer for causal-lm experts), padding set.

    Raises:
        InvalidArgument: it does not load.
    """
    from transformers import AutoProcessor, AutoTokenizer

    first = manifest.experts[manifest.present_experts[0]]
    # A LoRA adapter folder may hold only the adapter; the base always has the processor.
    folder = directory / (
        first.path if first.kind == "full" or manifest.base is None else manifest.base.path
    )
    if (directory / first.path / "tokenizer_config.json").is_file():
        folder = directory / first.path
    loader: Any = AutoTokenizer if manifest.architecture == "causal-lm" else AutoProcessor
    try:
        processor = loader.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidArgument(f"{folder}: cannot load its processor ({error})") from None
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor
