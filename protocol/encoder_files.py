"""What an encoder spec names, and the files of a feature model, without torch.

The feature model (:mod:`protocol.feature_model`, which loads it) and the assembly (which
only copies and checks the files) must agree on which files make an ``hf:`` encoder, on its
identity, and on the open_clip configurations bundled here (``clip_configs/``), so both read
them from here; nothing here imports torch, so ``coordinator assemble`` stays light.

Example::

    spec = EncoderName.parse("hf:/models/clip-vit-large-patch14-336")
    identity = hf_identity(spec.path)      # digests of config, preprocessing and weights
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.digests import file_sha256
from protocol.errors import InvalidArgument, NotFound

__all__ = [
    "HF_CONFIG_FILES",
    "HF_TOKENIZER_FILES",
    "INIT_SEED",
    "OPEN_CLIP_CONFIGS",
    "TINY_MODEL",
    "EncoderName",
    "hf_files",
    "hf_identity",
]

# What decides an hf CLIP's image features: its config and its image preprocessing (the
# weights are found by suffix). The tokenizer files only serve the clip-text strategy.
HF_CONFIG_FILES = ("config.json", "preprocessor_config.json")
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)
# open_clip model configurations that ship with Atoll (registered before a model loads):
# TINY_MODEL is a tiny CLIP for tests and the demo that never downloads anything.
OPEN_CLIP_CONFIGS = Path(__file__).parent / "clip_configs"
TINY_MODEL = "atoll-tiny-clip"
# An open_clip encoder without weights draws them from this seed, so it is the same model in
# the partitioner, at assembly and in the router.
INIT_SEED = 0


@dataclass(frozen=True)
class EncoderName:
    """A parsed encoder spec: ``open_clip:MODEL[:PRETRAINED]`` or ``hf:PATH``."""

    spec: str
    backend: str
    model: str
    pretrained: str | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str, flag: str = "--encoder") -> EncoderName:
        """Raises InvalidArgument for a malformed spec (naming ``flag``)."""
        backend, _, rest = spec.partition(":")
        if backend == "open_clip" and rest:
            model, _, pretrained = rest.partition(":")
            return cls(spec, backend, model, pretrained or None)
        if backend == "hf" and rest:
            return cls(spec, backend, Path(rest).name, path=Path(rest))
        raise InvalidArgument(
            f"{flag} {spec!r}: expected 'open_clip:MODEL', 'open_clip:MODEL:PRETRAINED' "
            f"(a local weights file or an open_clip tag) or 'hf:PATH' (e.g. open_clip:{TINY_MODEL})"
        )


def _check_clip_folder(path: Path, flag: str) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise NotFound(
            f"{flag} hf:{path}: no config.json there (a saved CLIPModel folder, e.g. "
            "openai/clip-vit-large-patch14-336)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"{flag} hf:{path}: config.json is not JSON ({error})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "clip":
        raise InvalidArgument(
            f"{flag} hf:{path}: config.json has model_type {kind!r}, expected 'clip' (a "
            "Hugging Face CLIPModel folder with both towers, e.g. openai/clip-vit-large-patch14-336)"
        )
    if not (path / "preprocessor_config.json").is_file():
        raise NotFound(
            f"{flag} hf:{path}: no preprocessor_config.json (the image preprocessing is part "
            "of the encoder: save the CLIPImageProcessor into the folder)"
        )
    return dict(config)


def _weights(path: Path) -> list[Path]:
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
    # transformers prefers safetensors; a .bin is only read when there is none.
    return weights or sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".bin")


def hf_files(path: Path, flag: str = "--encoder") -> list[Path]:
    """The files of a CLIP folder that the router loads: config, preprocessing, weights, and
    the tokenizer's files when present.

    Raises:
        NotFound, InvalidArgument: not a CLIPModel folder (named, with the expected type).
    """
    _check_clip_folder(path, flag)
    weights = _weights(path)
    if not weights:
        raise NotFound(f"{flag} hf:{path}: no .safetensors or .bin weights in the folder")
    files = [path / name for name in HF_CONFIG_FILES]
    files += [path / name for name in HF_TOKENIZER_FILES if (path / name).is_file()]
    return files + weights


def hf_identity(path: Path, flag: str = "--encoder") -> dict[str, Any]:
    """The plan's identity of an hf CLIP folder: digests of everything that decides its image
    features, its image size and feature dimension (read from config.json).

    Raises:
        NotFound, InvalidArgument: not a CLIPModel folder.
    """
    config = _check_clip_folder(path, flag)
    weights = _weights(path)
    if not weights:
        raise NotFound(f"{flag} hf:{path}: no .safetensors or .bin weights in the folder")
    vision = config.get("vision_config") or {}
    return {
        "backend": "hf",
        "model": path.name,
        "weights": {p.name: file_sha256(p) for p in weights},
        "config_sha256": file_sha256(path / "config.json"),
        "preprocessor_sha256": file_sha256(path / "preprocessor_config.json"),
        "image_size": int(vision.get("image_size", 224)),
        "dim": int(config.get("projection_dim", 512)),
    }
