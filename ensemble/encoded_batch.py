"""A batch of prompts encoded once, from which every model call of a generation takes its rows."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from ensemble.shared_tower import take_rows

__all__ = ["EncodedBatch", "Encoder"]

Encoder = Callable[[Sequence[Image.Image | None], Sequence[str]], Any]
"""Model inputs (left-padded ``input_ids``, ``attention_mask``, ``pixel_values``) of images
and prompts: :meth:`ensemble.runtime.RoutedEnsemble.encode_inputs`."""


class EncodedBatch:
    """A batch encoded once (chat template, tokens, left padding, pixels); every unit of
    generation takes its rows from here, so nothing is preprocessed twice."""

    def __init__(
        self,
        encode: Encoder,
        pictures: list[Image.Image | None],
        prompts: Sequence[str],
    ) -> None:
        self.encode = encode
        self.pictures = pictures
        self.prompts = list(prompts)
        self.has_image = [p is not None for p in pictures]
        self.inputs = encode(pictures, prompts)
        pixels = self.inputs.get("pixel_values")
        # LLaVA gives each image one row of pixel_values; models that tile (InternVL) do not,
        # and their rows are encoded again per unit.
        self.one_row_per_image = pixels is None or len(pixels) == sum(self.has_image)
        rows = itertools.accumulate(self.has_image, initial=0)
        self.image_row = list(rows)[:-1]
        self.tower_output: Any = None
        self.handed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def select(self, samples: Sequence[int]) -> dict[str, torch.Tensor]:
        """The model inputs of ``samples`` (repeats allowed), in that order; padding columns
        that no selected row needs are dropped."""
        if not self.one_row_per_image and any(self.has_image[i] for i in samples):
            batch = self.encode(
                [self.pictures[i] for i in samples], [self.prompts[i] for i in samples]
            )
            return dict(batch)
        device = self.inputs["input_ids"].device
        index = torch.tensor(list(samples), device=device)
        mask = self.inputs["attention_mask"][index]
        first = int(mask.any(dim=0).int().argmax())
        selected = {
            "input_ids": self.inputs["input_ids"][index, first:],
            "attention_mask": mask[:, first:],
        }
        image_rows = [self.image_row[i] for i in samples if self.has_image[i]]
        if image_rows:
            rows = torch.tensor(image_rows, device=device)
            pixels = self.inputs["pixel_values"][rows]
            if self.tower_output is not None:
                self.handed[id(pixels)] = (pixels, rows)
            selected["pixel_values"] = pixels
        return selected

    def handed_output(self, pixels: torch.Tensor) -> Any:
        """The routing pass's tower output for ``pixels`` if :meth:`select` made them."""
        entry = self.handed.get(id(pixels))
        if entry is None or entry[0] is not pixels:
            return None
        return take_rows(self.tower_output, entry[1])
