"""The dense baseline of ``atoll eval``: one plain Hugging Face vision-language model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ensemble.processor import chat_prompt
from ensemble.scheduling import slices
from protocol.errors import InvalidArgument, NotFound

__all__ = ["DenseModel"]


class DenseModel:
    """A plain Hugging Face vision-language model directory (``save_pretrained`` output, e.g.
    the dense baseline's checkpoint), answering greedily with the same prompt the ensemble's
    experts get."""

    def __init__(
        self,
        directory: Path,
        device: str | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 16,
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not (directory / "config.json").is_file():
            raise NotFound(f"--dense {directory}: no config.json; not a model directory")
        try:
            self.processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, TypeError) as error:
            raise InvalidArgument(f"--dense {directory}: does not load ({error})") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, images: Sequence[Image.Image | None], questions: Sequence[str]) -> list[str]:
        return [
            answer
            for part in slices(len(questions), self.batch_size)
            for answer in self._batch(images[part], questions[part])
        ]

    def _batch(self, images: Sequence[Image.Image | None], questions: Sequence[str]) -> list[str]:
        import torch

        # RoutedEnsemble.prompt_text's rendering, so dense and ensemble answer the same prompt.
        texts = [
            chat_prompt(self.processor, q, i is not None)
            for i, q in zip(images, questions, strict=True)
        ]
        pictures = [i for i in images if i is not None]
        if pictures:
            batch = self.processor(images=pictures, text=texts, padding=True, return_tensors="pt")
        else:
            batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        batch = batch.to(self.device)
        with torch.inference_mode():
            output = self.model.generate(
                **batch,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        start = batch["input_ids"].shape[1]
        answers: list[str] = self.tokenizer.batch_decode(
            output[:, start:], skip_special_tokens=True
        )
        return [a.strip() for a in answers]
