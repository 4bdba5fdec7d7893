"""A tiny ensemble directory built from scratch, as the coordinator's assembly would lay it out.

Two tiny LLaVA experts (``configs/tiny-cpu.yaml``'s size, distinct init seeds), the plan's
tiny open_clip feature model (random weights, seed 0), centroids of two kinds of synthetic
pictures (red squares, blue circles) and an ``atoll_ensemble.json`` listing every file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from protocol.digests import file_entry, file_sha256, folder_digests
from protocol.encoder_files import OPEN_CLIP_CONFIGS
from protocol.ensemble_manifest import MANIFEST_FILE, expert_path
from protocol.feature_model import load_encoder
from protocol.recipe import load_recipe
from site_agent.training.model import load_model, load_processor

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "configs" / "tiny-cpu.yaml"
CLIP_CONFIG = OPEN_CLIP_CONFIGS / "atoll-tiny-clip.json"
KINDS = {"red-square": ((220, 30, 30), "square"), "blue-circle": ((30, 40, 220), "circle")}


def picture(kind: str, variant: int = 0) -> Image.Image:
    """A synthetic picture of one kind; ``variant`` shifts it a little."""
    colour, shape = KINDS[kind]
    image = Image.new("RGB", (40, 40), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (4 + variant, 4 + variant, 34 - variant, 34 - variant)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colour)
    return image


def write_pictures(directory: Path, per_kind: int = 4) -> dict[str, list[Path]]:
    """PNG files of each kind (what the partitioner would have encoded)."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {}
    for kind in KINDS:
        for variant in range(per_kind):
            path = directory / f"{kind}-{variant}.png"
            picture(kind, variant).save(path)
            files.setdefault(kind, []).append(path)
    return files


def tiny_settings(init_seed: int, size: dict[str, int] | None = None) -> Any:
    """``configs/tiny-cpu.yaml``'s model section with another seed and, optionally, other
    ``model.tiny`` dimensions."""
    recipe, _ = load_recipe(TINY_RECIPE)
    settings = recipe.model
    tiny = settings.tiny.model_copy(update=size or {}) if settings.tiny else None
    return settings.model_copy(update={"init_seed": init_seed, "tiny": tiny})


def save_expert(
    directory: Path,
    init_seed: int,
    size: dict[str, int] | None = None,
    vision_tower: dict[str, torch.Tensor] | None = None,
) -> None:
    """A tiny LLaVA expert with its processor, as ``save_pretrained`` writes it.

    ``vision_tower``: a state dict for its CLIP vision tower (experts fine-tuned from one base
    with the tower frozen, as LLaVA trains, all have the base's tower).
    """
    settings = tiny_settings(init_seed, size)
    processor = load_processor(settings, None)
    model: Any = load_model(settings, None, processor)
    if vision_tower is not None:
        model.model.vision_tower.load_state_dict(vision_tower)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def base_vision_tower(size: dict[str, int] | None = None, seed: int = 7) -> dict[str, torch.Tensor]:
    """The CLIP vision tower of a tiny LLaVA base (``seed``): what every expert keeps frozen."""
    settings = tiny_settings(seed, size)
    model: Any = load_model(settings, None, load_processor(settings, None))
    tower: dict[str, torch.Tensor] = model.model.vision_tower.state_dict()
    return tower


def save_clip_router(directory: Path, expert: Path, projection_seed: int = 5) -> dict[str, Any]:
    """A Hugging Face ``CLIPModel`` folder whose vision model is ``expert``'s own vision tower
    (config, weights and image preprocessing), with a seeded random ``visual_projection`` and
    a tiny text tower: the plan's feature model when partitioning used the experts' CLIP.
    Returns the manifest's ``router.encoder`` (without ``files``)."""
    from transformers import AutoProcessor, CLIPConfig, CLIPModel, LlavaForConditionalGeneration

    llava: Any = LlavaForConditionalGeneration.from_pretrained(expert)
    vision = llava.config.vision_config.to_dict()
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 16}
    text |= {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(projection_seed)
        clip = CLIPModel(config).eval()
    clip.vision_model.load_state_dict(llava.model.vision_tower.state_dict())
    clip.save_pretrained(directory)
    AutoProcessor.from_pretrained(expert).image_processor.save_pretrained(directory)
    side = int(vision["image_size"])
    return {
        "backend": "hf",
        "model": "tiny-llava-clip",
        "config_file": None,
        "weights_file": None,
        "init_seed": None,
        "directory": "router/encoder",
        "dim": 32,
        "image_size": side,
        "identity": {"backend": "hf", "model": "tiny-llava-clip"},
    }


def save_lora_expert(base: Path, directory: Path, seed: int, projector: bool = False) -> None:
    """A peft LoRA adapter over the saved ``base`` with random (non-zero) weights: what a LoRA
    site uploads (adapter + processor, no base weights). ``projector``: the multimodal
    projector trained in full beside it (``modules_to_save``, as LLaVA's recipe trains)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from protocol.recipe import Architecture
    from site_agent.training.model import language_model_lora_targets

    model = LlavaForConditionalGeneration.from_pretrained(base)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=language_model_lora_targets(Architecture.LLAVA),
        init_lora_weights=False,  # random A and B: each adapter changes the base's answers
        modules_to_save=["multi_modal_projector"] if projector else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapted = get_peft_model(model, config)
        if projector:
            for name, parameter in adapted.named_parameters():
                if "modules_to_save" in name:
                    parameter.data += 0.05 * torch.randn_like(parameter)
    adapted.save_pretrained(directory)
    AutoProcessor.from_pretrained(base).save_pretrained(directory)


def build_ensemble(
    root: Path,
    *,
    seeds: tuple[int, ...] = (11, 22),
    tau: float = 100.0,
    top_k: int = 1,
    text_only: str = "posterior",
    scratch: Path | None = None,
    lora: bool = False,
    lora_projector: bool = False,
    size: dict[str, int] | None = None,
    shared_encoder: bool = False,
) -> Path:
    """Writes an ensemble directory at ``root`` and returns it.

    Expert k is a tiny LLaVA initialised with ``seeds[k]`` (with ``lora``: a LoRA adapter
    seeded so, over one base); centroid 0 is the mean feature of the red squares, centroid 1
    of the blue circles (more experts reuse them in turn). ``size`` overrides the tiny
    model's dimensions (the benchmark's "small" model). The router is the plan's tiny
    open_clip model; with ``shared_encoder``, every expert keeps one base's vision tower and
    the router is a Hugging Face CLIP built on that same tower (:func:`save_clip_router`).
    """
    root.mkdir(parents=True)
    tower = base_vision_tower(size) if shared_encoder else None
    if lora:
        save_expert(root / "base", 7, size, vision_tower=tower)
    for index, seed in enumerate(seeds):
        if lora:
            save_lora_expert(root / "base", root / expert_path(index), seed, lora_projector)
        else:
            save_expert(root / expert_path(index), seed, size, vision_tower=tower)
    encoder_dir = root / "router" / "encoder"
    encoder_dir.mkdir(parents=True)
    files = write_pictures(scratch or root.parent / "pictures")
    if shared_encoder:
        spec = save_clip_router(encoder_dir, root / ("base" if lora else expert_path(0)))
        encode = _runtime_encoder(root, spec)
        identity = spec["identity"]
    else:
        shutil.copy(CLIP_CONFIG, encoder_dir / CLIP_CONFIG.name)
        # The plan's own encoder computes the centroids, so the runtime must agree with it.
        encoder = load_encoder("open_clip:atoll-tiny-clip", device="cpu")
        encode, identity, spec = encoder.encode, encoder.identity, None
    centroids = []
    for kind in KINDS:
        features, failures = encode(files[kind])
        assert not failures
        mean = features.mean(axis=0)
        centroids.append(mean / np.linalg.norm(mean))
    matrix = torch.from_numpy(np.stack([centroids[k % 2] for k in range(len(seeds))]))
    save_file({"centroids": matrix.contiguous()}, str(root / "router" / "centroids.safetensors"))
    (root / "README.md").write_text("# tiny test ensemble\n")
    router = {"tau": tau, "top_k": top_k, "text_only": text_only, "identity": identity}
    write_manifest(root, encoder=spec, **router)
    return root


def _runtime_encoder(root: Path, spec: dict[str, Any]) -> Any:
    """``encode(files) -> (features, failures)`` with the runtime's loader of ``spec``."""
    from protocol.ensemble_manifest import EncoderSpec
    from protocol.feature_model import load_feature_model

    model = load_feature_model(EncoderSpec(**spec), root, device="cpu")

    def encode(paths: list[Path]) -> tuple[np.ndarray, list[Path]]:
        features = model.encode_images([Image.open(path) for path in paths])
        return features.numpy(), []

    return encode


def write_manifest(root: Path, **overrides: Any) -> dict[str, Any]:
    """(Re)writes ``atoll_ensemble.json`` from what is on disk, with ``overrides`` applied to
    the router (``tau``, ``top_k``, ``text_only``, ``identity``) or the top level."""
    experts = sorted(int(p.name.split("-")[1]) for p in (root / "experts").iterdir() if p.is_dir())
    num_experts = overrides.pop("num_experts", max(experts) + 1)
    centroids = root / "router" / "centroids.safetensors"
    config = f"router/encoder/{CLIP_CONFIG.name}"
    identity = overrides.pop("identity", {"backend": "open_clip", "model": "atoll-tiny-clip"})
    encoder = overrides.pop("encoder", None)
    if encoder is None:
        encoder = {
            "backend": "open_clip",
            "model": "atoll-tiny-clip",
            "config_file": config,
            "weights_file": None,
            "init_seed": 0,
            "dim": 32,
            "image_size": 32,
        }
    files = folder_digests(root / "router" / "encoder")
    router = {
        "encoder": encoder
        | {
            "identity": identity,
            "files": {f"router/encoder/{name}": digest for name, digest in files.items()},
        },
        "centroids": {
            "path": "router/centroids.safetensors",
            "tensor": "centroids",
            "sha256": file_sha256(centroids),
            "size": centroids.stat().st_size,
        },
        "tau": overrides.pop("tau", 100.0),
        "top_k": overrides.pop("top_k", 1),
        "text_only": overrides.pop("text_only", "posterior"),
        "cluster_priors": overrides.pop("cluster_priors", [1.0 / num_experts] * num_experts),
    }
    entries = []
    for index in range(num_experts):
        folder = root / expert_path(index)
        present = folder.is_dir()
        entries.append(
            {
                "index": index,
                "path": expert_path(index),
                "present": present,
                "kind": "lora" if (folder / "adapter_config.json").is_file() else "full",
                "model_root_digest": None,
                "site": f"spiffe://test/site/s{index}" if present else None,
                "files": folder_digests(folder) if present else {},
            }
        )
    manifest: dict[str, Any] = {
        "format": "atoll-ensemble",
        "format_version": 1,
        "federation_id": "test",
        "plan_digest": "0" * 64,
        "architecture": "llava",
        "router": router,
        "experts": entries,
        "allow_partial": False,
        "missing_experts": [e["index"] for e in entries if not e["present"]],
        "base": {"path": "base", "files": folder_digests(root / "base")}
        if (root / "base").is_dir()
        else None,
        "other_files": {"README.md": file_entry(root / "README.md")},
    }
    manifest.update(overrides)
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest
