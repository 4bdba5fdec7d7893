"""The CLIP feature model: the one way an image becomes a feature, for partitioning and routing.

The router sends an image to the experts whose cluster centroid its feature is closest to, so
it must compute exactly the feature the partitioner computed for the same image: same model,
same seeded initialisation or weights, same preprocessing, same batching precision, same
normalisation, same centring. ``coordinator partition``, ``coordinator features`` and the
ensemble runtime therefore all load and run the encoder through this module.

Where the encoder comes from:

* :func:`load_encoder` -- a spec string (``--encoder``, ``--feature-encoder``, a features
  file's ``encoder``, the plan's ``encoder_spec``; parsed by
  :class:`protocol.encoder_files.EncoderName`): ``open_clip:MODEL`` (random weights, seeded),
  ``open_clip:MODEL:PRETRAINED`` (a local weights file or an open_clip tag) or ``hf:PATH``
  (a Hugging Face ``CLIPModel`` folder). ``open_clip:atoll-tiny-clip`` is a tiny bundled
  configuration for tests and the demo.
* :func:`load_feature_model` -- an ensemble manifest's ``router.encoder``, whose files the
  ensemble carries.

A plan made with ``--center`` clusters unit features minus the data set's mean feature
(:func:`mean_feature`), stores that mean beside the centroids, and the router subtracts it
again (:func:`centre`) before the cosine.

This module imports torch; the slim coordinator (``serve``, ``init``, ...) never imports it.
The encoder naming and the files of an ``hf`` folder are in the torch-free
:mod:`protocol.encoder_files`.

Example::

    model = load_encoder("open_clip:atoll-tiny-clip", device="cpu")
    features, failures = model.encode([Path("a.png"), Path("b.png")])   # the partitioner
    model.encode_images([Image.open("a.png")])                          # the router
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from protocol.digests import file_sha256
from protocol.encoder_files import (
    INIT_SEED,
    OPEN_CLIP_CONFIGS,
    TINY_MODEL,
    EncoderName,
    hf_identity,
)
from protocol.ensemble_manifest import EncoderSpec
from protocol.errors import InvalidArgument, NotFound

__all__ = [
    "TINY_MODEL",
    "EncodeFailure",
    "FeatureModel",
    "centre",
    "load_encoder",
    "load_feature_model",
    "mean_feature",
    "normalise_rows",
]


# The files that hold a CLIP tokenizer's vocabulary (a fast tokenizer, or a slow one's BPE).
_HF_VOCABULARY_FILES = ("tokenizer.json", "vocab.json")


@dataclass(frozen=True)
class EncodeFailure:
    """An image that could not be decoded."""

    path: Path
    reason: str


def normalise_rows(features: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit L2 norm (all-zero rows are left zero)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)


def mean_feature(unit_features: np.ndarray) -> np.ndarray:
    """The data set's mean unit feature (D float32, summed in float64): a centred plan
    clusters ``unit - mean`` and stores the mean beside its centroids for the router."""
    return np.asarray(unit_features.mean(axis=0, dtype=np.float64).astype(np.float32))


def centre(unit_features: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """Unit features as a centred plan's centroids see them: the plan's mean feature
    subtracted, renormalised (unchanged when the plan did not centre)."""
    if center is None:
        return unit_features
    moved = unit_features - center.to(unit_features.device)
    return torch.nn.functional.normalize(moved, dim=-1)


class _ImageFiles(torch.utils.data.Dataset[tuple[torch.Tensor, bool, str]]):
    """Decodes and preprocesses images; a bad file yields ``ok=False`` instead of raising, so
    one broken image is reported with the others rather than killing a worker."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Image.Image], Any]) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        try:
            with Image.open(self.paths[index]) as image:
                tensor = self.preprocess(image.convert("RGB"))
            return tensor, True, ""
        except Exception as error:  # PIL raises many kinds; every one is "unreadable"
            blank = self.preprocess(Image.new("RGB", (8, 8)))
            return torch.zeros_like(blank), False, f"{type(error).__name__}: {error}"


class FeatureModel:
    """A CLIP image tower (and text tower, when there is one) with its preprocessing.

    Every path runs the same steps: RGB, the encoder's own preprocessing, one batched forward
    pass (fp16 autocast on CUDA), float32, L2 normalisation.

    Attributes:
        dim: the feature dimension.
        device: where the model runs.
        clip: the Hugging Face ``CLIPModel`` behind an ``hf`` encoder (the runtime shares its
            vision tower with LLaVA experts whose tower is the same model), else None.
    """

    def __init__(
        self,
        identity: dict[str, Any],
        preprocess: Callable[[Image.Image], torch.Tensor],
        image_forward: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        *,
        text_forward: Callable[[Sequence[str]], torch.Tensor] | None = None,
        clip: Any = None,
    ) -> None:
        self._identity = identity
        self.dim = int(identity["dim"])
        self.preprocess = preprocess
        self._image_forward = image_forward
        self._text_forward = text_forward
        self.device = device
        self.clip = clip

    @property
    def identity(self) -> dict[str, Any]:
        """JSON-able description that changes whenever the features could (recorded in the
        plan; its digest keys the partitioner's feature cache)."""
        return dict(self._identity)

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The preprocessed batch, on the model's device."""
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(
            self.device
        )

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` unit-norm float32 features of an already preprocessed batch."""
        with torch.inference_mode(), self._autocast():
            output = self._image_forward(pixels.to(self.device, non_blocking=True)).float()
        return torch.nn.functional.normalize(output, dim=-1)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(B, D)`` unit-norm float32 image features."""
        return self.encode_pixels(self.pixels(images))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(B, D)`` unit-norm float32 text features (the ``clip-text`` strategy).

        Raises:
            InvalidArgument: the model has no text tower (or no tokenizer).
        """
        if self._text_forward is None:
            raise InvalidArgument(
                "text_only 'clip-text': the router's feature model has no text tower "
                "(use 'uniform' or 'posterior')"
            )
        with torch.inference_mode(), self._autocast():
            output = self._text_forward(texts).float()
        return torch.nn.functional.normalize(output, dim=-1)

    def encode(
        self,
        paths: Sequence[Path],
        *,
        batch_size: int = 64,
        workers: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, list[EncodeFailure]]:
        """Unit-norm float32 features of image files (``len(paths) x D``; zero rows where
        decoding failed) and the failures; ``workers`` processes decode ahead."""
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, self.preprocess),
            batch_size=batch_size,
            num_workers=workers,
            shuffle=False,
            pin_memory=self.device.type == "cuda",
        )
        chunks: list[np.ndarray] = []
        failures: list[EncodeFailure] = []
        done = 0
        for pixels, ok, reasons in loader:
            features = self.encode_pixels(pixels).cpu().numpy()
            bad = ~ok.numpy()
            features[bad] = 0.0
            chunks.append(features)
            for offset in np.flatnonzero(bad).tolist():
                failures.append(EncodeFailure(paths[done + offset], reasons[offset]))
            done += len(ok)
            if progress is not None:
                progress(len(ok))
        out = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(out, dtype=np.float32), failures


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_encoder(
    spec: str, *, device: str | torch.device | None = None, flag: str = "--encoder"
) -> FeatureModel:
    """The feature model a spec string names (see the module docstring), with its identity.

    Raises:
        InvalidArgument: a malformed spec, an unknown open_clip model, or an ``hf:`` folder
            that is not a CLIP model.
        NotFound: a local weights path or folder that does not exist.
    """
    name = EncoderName.parse(spec, flag)
    if name.backend == "hf":
        assert name.path is not None
        # hf_identity checks it is a CLIP folder before anything loads.
        return _hf_clip(
            name.path, hf_identity(name.path, flag), _device(device), f"{flag} hf:{name.path}"
        )
    import open_clip

    open_clip.add_model_config(OPEN_CLIP_CONFIGS)
    model, pretrained = name.model, name.pretrained
    if model not in open_clip.list_models():
        raise InvalidArgument(
            f"--encoder open_clip:{model}: unknown open_clip model "
            f"(e.g. ViT-B-16, ViT-L-14-336, {TINY_MODEL})"
        )
    identity: dict[str, Any] = {"backend": "open_clip", "model": model}
    if pretrained is None:
        identity["weights"] = {"random_init_seed": INIT_SEED}
    elif (
        Path(pretrained).exists()
        or os.sep in pretrained
        or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))
    ):
        weights = Path(pretrained)
        if not weights.is_file():
            raise NotFound(f"--encoder open_clip:{model}:{pretrained}: no such weights file")
        identity["weights"] = {"file": weights.name, "sha256": file_sha256(weights)}
    else:
        identity["weights"] = {"open_clip_tag": pretrained}
    return _open_clip(model, pretrained, INIT_SEED, identity, _device(device))


def load_feature_model(
    spec: EncoderSpec, directory: Path, *, device: str | torch.device | None = None
) -> FeatureModel:
    """The feature model an ensemble manifest names, from the ensemble's own files.

    Args:
        spec: The manifest's ``router.encoder``.
        directory: The ensemble directory (``spec``'s paths are relative to it).
        device: Where to run it; default CUDA when available.

    Raises:
        NotFound: a file the spec names is not there.
        InvalidArgument: the files do not load as the spec says, or give another dimension.
    """
    target = _device(device)
    identity = dict(spec.identity)
    if spec.backend == "open_clip":
        import open_clip

        assert spec.config_file is not None  # the manifest validator guarantees it
        config = _existing(directory, spec.config_file, "config_file")
        if config.stem != spec.model:
            # open_clip registers a config file under its stem; the plan named the model.
            raise InvalidArgument(
                f"router.encoder.config_file: {spec.config_file} registers model "
                f"{config.stem!r}, but router.encoder.model is {spec.model!r}"
            )
        open_clip.add_model_config(config)
        weights = None
        if spec.weights_file is not None:
            weights = str(_existing(directory, spec.weights_file, "weights_file"))
        seed = spec.init_seed if spec.init_seed is not None else INIT_SEED
        model = _open_clip(spec.model, weights, seed, identity, target)
    else:
        assert spec.directory is not None  # the manifest validator guarantees it
        folder = _existing(directory, spec.directory, "directory")
        label = f"router.encoder.directory: {spec.directory}"
        model = _hf_clip(folder, identity, target, label)
    if model.dim != spec.dim:
        raise InvalidArgument(
            f"router.encoder.dim: the manifest says {spec.dim}, the model gives {model.dim}"
        )
    return model


def _existing(directory: Path, relative: str, field: str) -> Path:
    path = directory / relative
    if not path.exists():
        raise NotFound(f"router.encoder.{field}: {relative} is not in {directory}")
    return path


def _open_clip(
    model: str,
    pretrained: str | None,
    seed: int,
    identity: dict[str, Any],
    device: torch.device,
) -> FeatureModel:
    """An open_clip model whose config is registered; ``identity`` gains its image size and
    feature dimension."""
    import open_clip

    # Seeding inside a forked RNG makes random weights reproducible without disturbing the
    # caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device
        )
    clip.eval()
    image_size = clip.visual.image_size
    identity["image_size"] = list(image_size) if isinstance(image_size, tuple) else image_size
    projection = getattr(clip, "text_projection", None)
    has_text = isinstance(projection, torch.Tensor) and projection.ndim == 2
    if has_text:
        assert isinstance(projection, torch.Tensor)
        identity["dim"] = int(projection.shape[1])
    else:
        with torch.inference_mode():
            probe = preprocess(Image.new("RGB", (8, 8)))[None].to(device)
            identity["dim"] = int(clip.encode_image(probe).shape[-1])
    tokenizer: list[Any] = []  # built on first use: only the clip-text strategy needs it

    def text_forward(texts: Sequence[str]) -> torch.Tensor:
        if not tokenizer:
            tokenizer.append(open_clip.get_tokenizer(model))
        return clip.encode_text(tokenizer[0](list(texts)).to(device))

    return FeatureModel(
        identity,
        preprocess,
        clip.encode_image,
        device,
        text_forward=text_forward if has_text else None,
    )


def _hf_clip(
    folder: Path, identity: dict[str, Any], device: torch.device, label: str
) -> FeatureModel:
    """A Hugging Face CLIPModel folder; ``label`` names it in errors; ``identity`` gains its
    image size and feature dimension."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"{label} does not load as a CLIPModel ({error})") from None
    # An image-only folder: clip-text is unavailable, not an error. transformers would build an
    # empty CLIPTokenizer from config.json alone (every word unknown, every text one feature),
    # so only a folder with a vocabulary has a text tower.
    tokenizer: Any = None
    if any((folder / name).is_file() for name in _HF_VOCABULARY_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    identity["image_size"] = int(model.config.vision_config.image_size)
    identity["dim"] = int(model.config.projection_dim)

    def preprocess(image: Image.Image) -> torch.Tensor:
        values = processor(images=image, return_tensors="np")["pixel_values"][0]
        return torch.as_tensor(np.asarray(values))

    def image_forward(pixels: torch.Tensor) -> torch.Tensor:
        output = model.get_image_features(pixel_values=pixels)
        # transformers 5 returns the vision outputs with the projected pooler output.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def text_forward(texts: Sequence[str]) -> torch.Tensor:
        batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        output = model.get_text_features(**batch.to(device))
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    return FeatureModel(
        identity,
        preprocess,
        image_forward,
        device,
        text_forward=text_forward if tokenizer is not None else None,
        clip=model,
    )
