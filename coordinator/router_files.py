"""The router's files in an ensemble: the plan's feature model, centroids and cluster priors.

The router must compute for a new image exactly the feature the partitioner computed, so the
ensemble carries the plan's encoder itself, checked against the plan's identity:

* ``open_clip``: its model config JSON (``router/encoder/<model>.json``) and either the seed of
  its random initialisation or its weights file (``--encoder-weights FILE``);
* ``hf``: the Hugging Face ``CLIPModel`` folder (``router/encoder/<model>/``: config, image
  preprocessing, weights, and the tokenizer when present), found where the plan's spec points
  or at ``--encoder-weights DIR``; every file that decides the features must hash to the
  plan's digests.

A plan made from a features file names its encoder (``encoder_spec``); an old plan that does
not is refused with the command that fixes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from coordinator.state import StateDir
from protocol.digests import copy_and_hash, file_sha256, folder_digests
from protocol.encoder_files import (
    INIT_SEED,
    OPEN_CLIP_CONFIGS,
    EncoderName,
    hf_files,
    hf_identity,
)
from protocol.errors import FailedPrecondition, VerificationFailed
from protocol.partition_plan import PartitionPlan

__all__ = ["cluster_priors", "router_centroids", "router_encoder"]

# hf identity entries that must match between the plan and the files assembled.
_HF_DIGESTS = ("weights", "config_sha256", "preprocessor_sha256")


def router_encoder(plan: PartitionPlan, staging: Path, weights_file: Path | None) -> dict[str, Any]:
    """Copies the plan's feature model into ``router/encoder/``; returns the manifest entry.

    Raises:
        FailedPrecondition: the plan names no encoder, or its files are not at hand.
        VerificationFailed: the files are not the ones the plan was made with.
    """
    identity = dict(plan.encoder or {})
    spec = plan.encoder_spec
    if identity.get("backend") not in ("open_clip", "hf"):
        raise FailedPrecondition(
            "the partition plan does not name the encoder that computed its features "
            f"(encoder {identity.get('backend')!r}), so no router can compute them for new "
            "images: re-run `coordinator partition ... --features FILE.npz --feature-encoder "
            "SPEC` (or save encoder='SPEC' in the .npz), e.g. SPEC = "
            "hf:/models/clip-vit-large-patch14-336"
        )
    # Plans made before encoder_spec was recorded: the identity alone names the model.
    name = EncoderName.parse(
        spec if isinstance(spec, str) else f"{identity['backend']}:{identity['model']}",
        "the plan's encoder_spec",
    )
    if identity.get("unchecked"):
        # The features came from elsewhere and the encoder did not load at partition time:
        # its identity is fixed now, from the files assembled.
        identity = _identity_now(name, weights_file, int(identity["dim"]))
    if identity["backend"] == "hf":
        return _hf(name, identity, staging, weights_file)
    return _open_clip(identity, staging, weights_file)


def _identity_now(name: EncoderName, weights_file: Path | None, dim: int) -> dict[str, Any]:
    if name.backend == "hf":
        identity = hf_identity(_hf_folder(name, weights_file), "--encoder-weights")
    else:
        identity = {"backend": "open_clip", "model": name.model}
        if name.pretrained is None:
            identity["weights"] = {"random_init_seed": INIT_SEED}
        else:
            file = weights_file or Path(name.pretrained)
            if not file.is_file():
                raise FailedPrecondition(
                    f"the plan's encoder {name.spec!r} uses weights {name.pretrained!r}: give "
                    "that file with --encoder-weights FILE"
                )
            identity["weights"] = {"file": file.name, "sha256": file_sha256(file)}
        identity["image_size"] = _open_clip_config(name.model)["vision_cfg"]["image_size"]
        identity["dim"] = int(_open_clip_config(name.model)["embed_dim"])
    if int(identity["dim"]) != dim:
        raise VerificationFailed(
            f"the plan's features have dimension {dim}, encoder {name.spec!r} gives "
            f"{identity['dim']}: it is not the encoder that computed them"
        )
    return identity


def _hf_folder(name: EncoderName, weights_file: Path | None) -> Path:
    folder = weights_file or name.path
    if folder is None or not folder.is_dir():
        raise FailedPrecondition(
            f"the plan's encoder is the CLIP folder {name.path}, which is not here: give its "
            "copy with --encoder-weights DIR"
        )
    return folder


def _hf(
    name: EncoderName, identity: dict[str, Any], staging: Path, weights_file: Path | None
) -> dict[str, Any]:
    folder = _hf_folder(name, weights_file)
    actual = hf_identity(folder, "--encoder-weights")
    for key in _HF_DIGESTS:
        if key in identity and actual[key] != identity[key]:
            raise VerificationFailed(
                f"--encoder-weights {folder}: {key} differs from the plan's encoder (expected "
                f"{identity[key]}, found {actual[key]}): not the CLIP the plan was made with"
            )
    model = str(identity["model"])
    target = staging / "router" / "encoder" / model
    target.mkdir(parents=True)
    copied = {
        path.name: copy_and_hash(path, target / path.name)
        for path in hf_files(folder, "--encoder-weights")
    }
    directory = f"router/encoder/{model}"
    return {
        "backend": "hf",
        "model": model,
        "directory": directory,
        "dim": int(identity["dim"]),
        "image_size": identity["image_size"],
        "identity": identity,
        "files": {f"{directory}/{n}": d.entry() for n, d in sorted(copied.items())},
    }


def _open_clip_config(model: str) -> dict[str, Any]:
    bundled = OPEN_CLIP_CONFIGS / f"{model}.json"
    if bundled.is_file():
        return dict(json.loads(bundled.read_text()))
    import open_clip

    config = open_clip.get_model_config(model)
    if config is None:
        raise FailedPrecondition(f"plan encoder {model!r}: open_clip has no such model")
    return dict(config)


def _open_clip(
    identity: dict[str, Any], staging: Path, weights_file: Path | None
) -> dict[str, Any]:
    model = str(identity["model"])
    folder = staging / "router" / "encoder"
    folder.mkdir(parents=True)
    config_name = f"router/encoder/{model}.json"
    bundled = OPEN_CLIP_CONFIGS / f"{model}.json"
    if bundled.is_file():
        shutil.copyfile(bundled, staging / config_name)
    else:
        (staging / config_name).write_text(json.dumps(_open_clip_config(model), indent=2) + "\n")
    weights = identity.get("weights") or {}
    entry: dict[str, Any] = {
        "backend": "open_clip",
        "model": model,
        "config_file": config_name,
        "weights_file": None,
        "init_seed": None,
        "dim": int(identity["dim"]),
        "image_size": identity["image_size"],
        "identity": identity,
    }
    known: dict[str, str] = {}
    if "random_init_seed" in weights:
        entry["init_seed"] = int(weights["random_init_seed"])
    elif "sha256" in weights:
        if weights_file is None or not weights_file.is_file():
            raise FailedPrecondition(
                f"the plan's encoder used weights {weights.get('file')!r}: give that file with "
                "--encoder-weights FILE"
            )
        # Checked as copied: the bytes in the ensemble are the bytes that matched the plan.
        name = f"router/encoder/{weights.get('file') or weights_file.name}"
        actual = copy_and_hash(weights_file, staging / name).sha256
        if actual != weights["sha256"]:
            raise VerificationFailed(
                f"--encoder-weights {weights_file}: expected sha256 {weights['sha256'][:16]}.. "
                f"(the plan's encoder), got {actual[:16]}.."
            )
        entry["weights_file"] = name
        known[name.removeprefix("router/encoder/")] = actual
    else:
        raise FailedPrecondition(
            f"the plan's encoder weights {weights}: assembly needs a seeded random "
            "initialisation or a local weights file (--encoder-weights)"
        )
    files = folder_digests(folder, known=known)
    entry["files"] = {f"router/encoder/{n}": d for n, d in files.items()}
    return entry


def router_centroids(state: StateDir, staging: Path, num_experts: int, dim: int) -> dict[str, Any]:
    """Copies the plan's centroids (and mean feature, when the plan centred) byte for byte;
    returns the manifest entry."""
    from safetensors import safe_open

    source = state.partition_dir / "centroids.safetensors"
    target = staging / "router" / "centroids.safetensors"
    if not source.is_file():
        raise FailedPrecondition(f"{source}: the plan's centroids are missing")
    shutil.copyfile(source, target)
    with safe_open(str(target), framework="numpy") as handle:
        shape = list(handle.get_slice("centroids").get_shape())
        center = "center" in handle.keys()  # noqa: SIM118 - safe_open has no __contains__
        center_shape = list(handle.get_slice("center").get_shape()) if center else [dim]
    if shape != [num_experts, dim] or center_shape != [dim]:
        raise FailedPrecondition(
            f"{source}: expected centroids of shape [{num_experts}, {dim}] (K experts x the "
            f"encoder's dim) and a center of [{dim}], got {shape} and {center_shape}"
        )
    entry: dict[str, Any] = {
        "path": "router/centroids.safetensors",
        "tensor": "centroids",
        "sha256": file_sha256(target),
        "size": target.stat().st_size,
    }
    if center:
        entry["center_tensor"] = "center"
    return entry


def cluster_priors(plan: PartitionPlan, num_experts: int) -> list[float]:
    """p(S_k): each cluster's share of the plan's training samples."""
    counts = [0] * num_experts
    for row in plan.clusters:
        if row.expert < num_experts:
            counts[row.expert] = row.samples
    total = sum(counts)
    if total == 0:
        return [1.0 / num_experts] * num_experts
    return [count / total for count in counts]
