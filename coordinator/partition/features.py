"""CLIP image features for partitioning: encoders, a feature cache, precomputed features.

An encoder is named by a spec string:

* ``open_clip:MODEL`` -- an open_clip architecture with random weights (seeded, so the same
  every run). ``open_clip:atoll-tiny-clip`` is a tiny bundled configuration for tests and the
  demo: it never downloads anything.
* ``open_clip:MODEL:PRETRAINED`` -- with weights from a local file (a path) or an open_clip
  pretrained tag (which open_clip may fetch into its cache).
* ``hf:PATH`` -- a Hugging Face ``CLIPModel`` saved at a local folder.

Features are L2-normalised. They are cached by image content digest under the state
directory, per encoder identity, so re-running or adding images only encodes what is new.
``--features FILE.npz`` supplies them instead: arrays ``ids`` (image paths as written in the
data set), ``features`` (N x D) and ``encoder`` (the spec of the encoder that computed them;
or ``--feature-encoder SPEC``): the router must compute the same features at inference, so a
plan without its encoder cannot be assembled.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from coordinator.partition.encoder_files import TINY_MODEL, EncoderName, hf_identity
from protocol.canonical import canonical_digest
from protocol.digests import file_sha256
from protocol.errors import InvalidArgument, NotFound

__all__ = [
    "TINY_MODEL",
    "EncodeFailure",
    "FeatureCache",
    "ImageEncoder",
    "load_encoder",
    "load_features_file",
    "normalise_rows",
]

_CONFIG_DIR = Path(__file__).parent / "configs"
# Random weights are drawn from this seed, so a random-weight encoder is the same every run.
_INIT_SEED = 0


@dataclass(frozen=True)
class EncodeFailure:
    """An image that could not be decoded."""

    path: Path
    reason: str


class ImageEncoder(Protocol):
    """What the partitioner needs from a feature model."""

    @property
    def identity(self) -> dict[str, Any]:
        """JSON-able description that changes whenever the features could (recorded in the
        plan; its digest keys the feature cache)."""
        ...

    def encode(
        self,
        paths: Sequence[Path],
        *,
        batch_size: int = 64,
        workers: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, list[EncodeFailure]]:
        """Unit-norm float32 features (``len(paths) x D``; zero rows where decoding failed)
        and the failures."""
        ...


def normalise_rows(features: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit L2 norm (all-zero rows are left zero)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)


class _ImageFiles(torch.utils.data.Dataset[tuple[torch.Tensor, bool, str]]):
    """Decodes and preprocesses images; a bad file yields ``ok=False`` instead of raising, so
    one broken image is reported with the others rather than killing a worker."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], Any]) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.placeholder: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        try:
            with Image.open(self.paths[index]) as image:
                tensor = self._pixels(image.convert("RGB"))
            return tensor, True, ""
        except Exception as error:  # PIL raises many kinds; every one is "unreadable"
            blank = self._pixels(Image.new("RGB", (8, 8)))
            return torch.zeros_like(blank), False, f"{type(error).__name__}: {error}"

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        pixels = self.transform(image)
        if isinstance(pixels, torch.Tensor):
            return pixels
        # Hugging Face image processors return a BatchFeature of one image.
        return torch.as_tensor(np.asarray(pixels["pixel_values"][0]))


class _TorchEncoder:
    """Shared batching for both backends: DataLoader workers, fp16 autocast on CUDA."""

    def __init__(
        self,
        identity: dict[str, Any],
        transform: Callable[[Image.Image], Any],
        forward: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> None:
        self._identity = identity
        self._transform = transform
        self._forward = forward
        self._device = device

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def encode(
        self,
        paths: Sequence[Path],
        *,
        batch_size: int = 64,
        workers: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, list[EncodeFailure]]:
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, self._transform),
            batch_size=batch_size,
            num_workers=workers,
            shuffle=False,
            pin_memory=self._device.type == "cuda",
        )
        chunks: list[np.ndarray] = []
        failures: list[EncodeFailure] = []
        done = 0
        autocast = (
            torch.autocast("cuda", dtype=torch.float16)
            if self._device.type == "cuda"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            for pixels, ok, reasons in loader:
                output = self._forward(pixels.to(self._device, non_blocking=True)).float()
                features = torch.nn.functional.normalize(output, dim=-1).cpu().numpy()
                bad = ~ok.numpy()
                features[bad] = 0.0
                chunks.append(features)
                for offset in np.flatnonzero(bad).tolist():
                    failures.append(EncodeFailure(paths[done + offset], reasons[offset]))
                done += len(ok)
                if progress is not None:
                    progress(len(ok))
        dim = int(self._identity["dim"])
        out = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
        return np.ascontiguousarray(out, dtype=np.float32), failures


def _default_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_encoder(spec: str, *, device: str | None = None, flag: str = "--encoder") -> ImageEncoder:
    """The encoder a spec names (see the module docstring).

    Raises:
        InvalidArgument: a malformed spec, an unknown open_clip model, or an ``hf:`` folder
            that is not a CLIP model.
        NotFound: a local weights path or folder that does not exist.
    """
    name = EncoderName.parse(spec, flag)
    if name.backend == "open_clip":
        return _open_clip_encoder(name.model, name.pretrained, _default_device(device))
    assert name.path is not None
    return _hf_encoder(name.path, _default_device(device), flag)


def _open_clip_encoder(model: str, pretrained: str | None, device: torch.device) -> ImageEncoder:
    import open_clip

    open_clip.add_model_config(_CONFIG_DIR)
    if model not in open_clip.list_models():
        raise InvalidArgument(
            f"--encoder open_clip:{model}: unknown open_clip model "
            f"(e.g. ViT-B-16, ViT-L-14-336, {TINY_MODEL})"
        )
    identity: dict[str, Any] = {"backend": "open_clip", "model": model}
    if pretrained is None:
        identity["weights"] = {"random_init_seed": _INIT_SEED}
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
    # Seeding inside a forked RNG makes random weights reproducible without disturbing the
    # caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device
        )
    clip.eval()
    visual = clip.visual
    image_size = visual.image_size
    identity["image_size"] = list(image_size) if isinstance(image_size, tuple) else image_size
    identity["dim"] = (
        int(clip.text_projection.shape[1])
        if _has_text(clip)
        else _probe_dim(clip.encode_image, preprocess, device)
    )

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return clip.encode_image(pixels)

    return _TorchEncoder(identity, preprocess, forward, device)


def _has_text(clip: Any) -> bool:
    projection = getattr(clip, "text_projection", None)
    return isinstance(projection, torch.Tensor) and projection.ndim == 2


def _probe_dim(
    forward: Callable[[torch.Tensor], torch.Tensor],
    preprocess: Callable[[Image.Image], Any],
    device: torch.device,
) -> int:
    with torch.inference_mode():
        pixels = preprocess(Image.new("RGB", (8, 8)))[None].to(device)
        return int(forward(pixels).shape[-1])


def _hf_encoder(path: Path, device: torch.device, flag: str = "--encoder") -> ImageEncoder:
    from transformers import CLIPImageProcessor, CLIPModel

    identity = hf_identity(path, flag)  # checks it is a CLIP folder before loading anything
    model = CLIPModel.from_pretrained(path).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(path)
    identity["image_size"] = int(model.config.vision_config.image_size)
    identity["dim"] = int(model.config.projection_dim)

    def transform(image: Image.Image) -> Any:
        return processor(images=image, return_tensors="np")

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        output = model.get_image_features(pixel_values=pixels)
        # transformers 5 returns the vision outputs with the projected pooler output.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    return _TorchEncoder(identity, transform, forward, device)


class FeatureCache:
    """Features by image content digest, for one encoder identity.

    Each run that encodes something adds one shard file (written to a temporary name, then
    renamed), so a crash never corrupts what was cached before and nothing is rewritten.
    """

    def __init__(self, root: Path, identity: dict[str, Any]) -> None:
        self.directory = root / canonical_digest(identity)[:32]

    def _shards(self) -> Iterator[Path]:
        if self.directory.is_dir():
            yield from sorted(self.directory.glob("shard-*.npz"))

    def load(self, wanted: set[str]) -> dict[str, np.ndarray]:
        """The cached features of the wanted digests (others are not read into memory)."""
        found: dict[str, np.ndarray] = {}
        for shard in self._shards():
            try:
                with np.load(shard, allow_pickle=False) as data:
                    digests, features = data["digests"], data["features"]
            except (OSError, ValueError, KeyError):
                continue  # an unreadable shard is only a cache miss
            for row, digest in enumerate(digests.tolist()):
                if digest in wanted and digest not in found:
                    found[digest] = features[row]
        return found

    def add(self, digests: Sequence[str], features: np.ndarray) -> None:
        """Stores new features (rows match ``digests``)."""
        if not digests:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard-{hashlib.sha256(''.join(digests).encode()).hexdigest()[:16]}"
        descriptor, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.directory)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                np.savez(handle, digests=np.array(digests), features=features)
            os.replace(tmp, self.directory / f"{name}-{uuid.uuid4().hex[:8]}.npz")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_features_file(
    path: Path, references: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Precomputed features for the given image references.

    Args:
        path: an ``.npz`` with ``ids`` (N image paths as written in the data set),
            ``features`` (N x D) and optionally ``encoder``, one string: the spec of the
            encoder that computed them (``hf:PATH`` or ``open_clip:MODEL[:PRETRAINED]``).
        references: every image reference the data set uses.

    Returns:
        ``(features by reference (unit rows), source)``: the file's name, sha256, dimension
        and the encoder it names (None if it names none).

    Raises:
        NotFound: no such file.
        InvalidArgument: missing arrays, wrong shapes, duplicate ids, non-finite or zero rows,
            or data set images the file has no features for.
    """
    if not path.is_file():
        raise NotFound(f"--features {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "ids" not in data or "features" not in data:
                raise InvalidArgument(
                    f"--features {path}: expected arrays 'ids' and 'features', "
                    f"found {sorted(data.files)}"
                )
            ids, features = data["ids"], data["features"]
            named = data.get("encoder")
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"--features {path}: not a readable .npz file ({error})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        raise InvalidArgument(
            f"--features {path}: ids: expected a 1-D array of strings, got {ids.dtype} "
            f"with shape {ids.shape}"
        )
    if features.ndim != 2 or features.shape[0] != ids.shape[0] or features.dtype.kind != "f":
        raise InvalidArgument(
            f"--features {path}: features: expected a float array of shape "
            f"({ids.shape[0]}, D), got {features.dtype} with shape {features.shape}"
        )
    id_list = [str(i) for i in ids.tolist()]
    row_of: dict[str, int] = {}
    for row, image_id in enumerate(id_list):
        if image_id in row_of:
            raise InvalidArgument(
                f"--features {path}: ids[{row}]: duplicate id {image_id!r} "
                f"(also ids[{row_of[image_id]}])"
            )
        row_of[image_id] = row
    absent = [ref for ref in references if ref not in row_of]
    if absent:
        shown = ", ".join(repr(a) for a in absent[:5])
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise InvalidArgument(
            f"--features {path}: its ids do not match the data set: no features for "
            f"{len(absent)} image(s): {shown}{more} (ids must be image paths as written in "
            "the data set)"
        )
    out: dict[str, np.ndarray] = {}
    for ref in references:
        row = row_of[ref]
        vector = features[row].astype(np.float32)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise InvalidArgument(
                f"--features {path}: features[{row}] (id {ref!r}) is "
                f"{'not finite' if not np.isfinite(norm) else 'all zeros'}"
            )
        out[ref] = vector / norm
    encoder = None
    if named is not None:
        if named.ndim > 1 or named.size != 1 or named.dtype.kind not in "US":
            raise InvalidArgument(
                f"--features {path}: encoder: expected one string naming the encoder (e.g. "
                f"'hf:/models/clip-vit-large-patch14-336'), got {named.dtype} with shape "
                f"{named.shape}"
            )
        encoder = str(named.reshape(()).item())
    source = {
        "file": path.name,
        "sha256": file_sha256(path),
        "dim": int(features.shape[1]),
        "encoder": encoder,
    }
    return out, source
