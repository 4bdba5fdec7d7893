"""``atoll_ensemble.json``: what an ensemble directory holds and how to route over it.

The coordinator's assembly writes this file; :func:`load_manifest` validates it once, at the
edge, and every error names the field to fix (``router.tau: Input should be greater than 0``).
The runtime then receives a typed :class:`EnsembleManifest` and never parses JSON itself.

An ensemble directory::

    atoll_ensemble.json             this manifest (signed by the coordinator's model.sig)
    router/centroids.safetensors    tensor "centroids", K x D float32 (the plan's centroids),
                                    and "center", the data set's mean feature (--center)
    router/encoder/...              the feature model's files (an open_clip config JSON and
                                    optional weights, or a Hugging Face CLIPModel folder)
    base/                           only for LoRA experts: the shared base checkpoint
    experts/expert-<k>/             save_pretrained directories, byte-for-byte as accepted
    README.md                       the model card

Every path in the manifest is relative to the ensemble directory (``/``-separated, no ``..``);
every file a consumer loads is listed with its size and sha256, so :func:`verify_files` can
check the whole directory offline.

Example (abridged)::

    {
      "format": "atoll-ensemble", "format_version": 1,
      "federation_id": "fed-7c1e", "plan_digest": "3f0a...", "architecture": "llava",
      "router": {
        "encoder": {"backend": "open_clip", "model": "atoll-tiny-clip",
                    "config_file": "router/encoder/atoll-tiny-clip.json",
                    "weights_file": null, "init_seed": 0, "dim": 32, "image_size": 32,
                    "identity": {...the plan's feature model identity...},
                    "files": {"router/encoder/atoll-tiny-clip.json": {"sha256": "...", "size": 312}}},
        "centroids": {"path": "router/centroids.safetensors", "tensor": "centroids",
                      "sha256": "...", "size": 392, "center_tensor": "center"},
        "tau": 11.7, "top_k": 1, "text_only": "posterior", "cluster_priors": [0.5, 0.5],
        "tau_fit": {"data_file": "eval.json", "data_sha256": "...", "samples": 250,
                    "bounds": [0.1, 1000.0], "log_likelihood": -0.4627,
                    "compared": {"1": -0.6130, "20": -0.4628, "50": -0.4636}}
      },
      "experts": [
        {"index": 0, "path": "experts/expert-0", "present": true, "kind": "full",
         "model_root_digest": "...", "site": "spiffe://fed-7c1e/site/a",
         "files": {"model.safetensors": {"sha256": "...", "size": 123}, ...}},
        {"index": 1, "path": "experts/expert-1", "present": false, "kind": "full",
         "model_root_digest": null, "site": null, "files": {}}
      ],
      "allow_partial": true, "missing_experts": [1], "base": null,
      "other_files": {"README.md": {"sha256": "...", "size": 2048}}
    }
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.digests import FileDigest, file_sha256
from protocol.errors import InvalidArgument, NotFound, VerificationFailed

__all__ = [
    "MANIFEST_FILE",
    "BaseSpec",
    "CentroidsSpec",
    "EncoderSpec",
    "EnsembleManifest",
    "ExpertEntry",
    "FileDigest",
    "RouterSpec",
    "TauFit",
    "TextOnlyStrategy",
    "expert_path",
    "listed_files",
    "load_manifest",
    "parse_manifest",
    "verify_files",
]

MANIFEST_FILE = "atoll_ensemble.json"
# Files that sign the manifest itself, so the manifest cannot list their digests.
_SIGNATURE_FILES = frozenset({MANIFEST_FILE, "model.sig", "ensemble.sigstore.json"})


def expert_path(index: int) -> str:
    """The directory of expert ``index`` inside an ensemble directory."""
    return f"experts/expert-{index}"


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a hand-edited manifest must not be ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _relative_path(value: str) -> str:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise ValueError(f"expected a relative path inside the ensemble directory, got {value!r}")
    return value


class TextOnlyStrategy(StrEnum):
    """How a prompt without an image is routed (the paper leaves this open)."""

    # Every present expert with equal weight.
    UNIFORM = "uniform"
    # softmax(tau * cos(CLIP text embedding, centroid)): the image router on the text tower.
    CLIP_TEXT = "clip-text"
    # The exact router of the theory: p(S_k | z) ∝ p(S_k) * prod_t p_k(z_t | z_<t), from the
    # cluster priors, updated after every token (the prompt's tokens included).
    POSTERIOR = "posterior"


class EncoderSpec(_Strict):
    """The plan's feature model, with the files the router loads it from.

    ``backend: open_clip``: ``config_file`` is the open_clip model config JSON (registered under
    ``model``); ``weights_file`` the weights, or null for the seeded random initialisation the
    partitioner uses (``init_seed``). ``backend: hf``: ``directory`` is a Hugging Face
    ``CLIPModel`` folder. ``identity`` is the plan's feature model identity verbatim, so an
    auditor can match the ensemble to its plan.
    """

    backend: Literal["open_clip", "hf"]
    model: str = Field(min_length=1)
    config_file: str | None = None
    weights_file: str | None = None
    init_seed: int | None = None
    directory: str | None = None
    dim: int = Field(ge=1)
    image_size: int | list[int]
    identity: dict[str, Any]
    files: dict[str, FileDigest] = Field(default_factory=dict)

    @field_validator("config_file", "weights_file", "directory")
    @classmethod
    def _inside(cls, value: str | None) -> str | None:
        return None if value is None else _relative_path(value)

    @model_validator(mode="after")
    def _complete(self) -> EncoderSpec:
        if self.backend == "open_clip":
            if self.config_file is None:
                raise ValueError("config_file: an open_clip encoder needs its model config JSON")
            if (self.weights_file is None) == (self.init_seed is None):
                raise ValueError(
                    "weights_file / init_seed: give exactly one (weights, or the seed of the "
                    "random initialisation)"
                )
        elif self.directory is None:
            raise ValueError("directory: an hf encoder needs its CLIPModel folder")
        for name in (self.config_file, self.weights_file):
            if name is not None and name not in self.files:
                raise ValueError(f"files: {name!r} is used but has no digest")
        return self


class CentroidsSpec(_Strict):
    """The router's centroids: a safetensors file holding one K x D float tensor."""

    path: str = "router/centroids.safetensors"
    tensor: str = "centroids"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    # A plan made with `--center`: the data set's mean feature (D floats) in the same file,
    # subtracted from every feature before the cosine.
    center_tensor: str | None = None

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        return _relative_path(value)


class TauFit(_Strict):
    """How ``tau`` was fitted (`coordinator assemble --fit-tau DATA.json`): the value that
    maximises the mixture's log-likelihood of the reference answers of held-out data,
    ``sum_i log sum_k softmax_k(tau * cos_i)_k * p_k(answer_i | image_i, question_i)``.

    ``log_likelihood`` is that sum per sample at the fitted tau; ``compared`` the same at a
    few fixed values (``{"1": ..., "20": ..., "50": ...}``).
    """

    data_file: str
    data_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    samples: int = Field(ge=1)
    bounds: tuple[float, float]
    log_likelihood: float
    compared: dict[str, float] = Field(default_factory=dict)


class RouterSpec(_Strict):
    """``p(S_k | image) = softmax_k(tau * cos(f(image), c_k))``, top-k, renormalised.

    ``encoder`` and ``centroids`` are null together for experts trained on a text-only data
    set (nothing was clustered): every prompt is text, routed by ``text_only``.
    """

    encoder: EncoderSpec | None
    centroids: CentroidsSpec | None
    tau: float = Field(gt=0, allow_inf_nan=False)
    top_k: int = Field(ge=1)
    text_only: TextOnlyStrategy = TextOnlyStrategy.POSTERIOR
    # p(S_k): each cluster's share of the training samples in the plan (sums to 1).
    cluster_priors: list[float]
    tau_fit: TauFit | None = None

    @model_validator(mode="after")
    def _image_router(self) -> RouterSpec:
        if (self.encoder is None) != (self.centroids is None):
            raise ValueError("encoder / centroids: give both (an image router) or neither")
        if self.encoder is None and self.text_only is TextOnlyStrategy.CLIP_TEXT:
            raise ValueError("text_only: 'clip-text' needs the image router's CLIP")
        return self

    @field_validator("cluster_priors")
    @classmethod
    def _distribution(cls, value: list[float]) -> list[float]:
        if not value or any(not math.isfinite(p) or p < 0 for p in value):
            raise ValueError("expected non-negative finite numbers, one per expert")
        if abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"expected them to sum to 1, got {sum(value)!r}")
        return value


class ExpertEntry(_Strict):
    """One expert: where it lives, whether the ensemble has it, what it must hash to.

    ``kind: lora`` experts are peft adapter folders over the manifest's ``base``. ``files`` is
    relative to ``path`` and lists every file of the directory (signatures included).
    """

    index: int = Field(ge=0)
    path: str
    present: bool
    kind: Literal["full", "lora"] = "full"
    model_root_digest: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    site: str | None = None
    files: dict[str, FileDigest] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        return _relative_path(value)

    @model_validator(mode="after")
    def _consistent(self) -> ExpertEntry:
        if self.path != expert_path(self.index):
            raise ValueError(f"path: expected {expert_path(self.index)!r}, got {self.path!r}")
        if self.present and not self.files:
            raise ValueError("files: a present expert must list its files and digests")
        for name in self.files:
            _relative_path(name)
        return self


class BaseSpec(_Strict):
    """The base checkpoint LoRA experts adapt (one copy, shared by every adapter)."""

    path: str = "base"
    files: dict[str, FileDigest]

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        return _relative_path(value)


class EnsembleManifest(_Strict):
    """The whole of ``atoll_ensemble.json`` (format version 1)."""

    format: Literal["atoll-ensemble"] = "atoll-ensemble"
    format_version: Literal[1] = 1
    federation_id: str = Field(min_length=1)
    plan_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    architecture: Literal["llava", "internvl", "causal-lm"] = "llava"
    created_at: str | None = None
    router: RouterSpec
    experts: list[ExpertEntry] = Field(min_length=1)
    # Assembled with `coordinator assemble --allow-partial`: the only way missing experts load.
    allow_partial: bool = False
    missing_experts: list[int] = Field(default_factory=list)
    base: BaseSpec | None = None
    other_files: dict[str, FileDigest] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleManifest:
        indices = [expert.index for expert in self.experts]
        if indices != list(range(len(self.experts))):
            raise ValueError(
                f"experts: expected indices 0..{len(indices) - 1} in order, got {indices}"
            )
        if len(self.router.cluster_priors) != len(self.experts):
            raise ValueError(
                f"router.cluster_priors: expected {len(self.experts)} (one per expert), "
                f"got {len(self.router.cluster_priors)}"
            )
        missing = [expert.index for expert in self.experts if not expert.present]
        if sorted(self.missing_experts) != missing:
            raise ValueError(
                f"missing_experts: expected {missing} (the experts marked present: false), "
                f"got {self.missing_experts}"
            )
        if missing and not self.allow_partial:
            raise ValueError(
                f"missing_experts: expert(s) {missing} are missing and allow_partial is false "
                "(assemble with --allow-partial to publish a partial ensemble)"
            )
        if len(missing) == len(self.experts):
            raise ValueError("experts: none is present")
        present = len(self.experts) - len(missing)
        if self.router.top_k > present:
            raise ValueError(
                f"router.top_k: expected 1..{present} (the present experts), got {self.router.top_k}"
            )
        if self.router.encoder is None and self.architecture != "causal-lm":
            raise ValueError(
                f"router.encoder: a {self.architecture} ensemble needs its image router"
            )
        lora = [e.index for e in self.experts if e.present and e.kind == "lora"]
        if lora and self.base is None:
            raise ValueError(f"base: LoRA experts {lora} need the base checkpoint")
        return self

    @property
    def num_experts(self) -> int:
        """K, the number of clusters (present or not)."""
        return len(self.experts)

    @property
    def present_experts(self) -> list[int]:
        """Indices of the experts this directory holds."""
        return [expert.index for expert in self.experts if expert.present]


def _field_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in item["loc"])
        # Cross-field checks run on the whole manifest and name their own field.
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def parse_manifest(data: Any, source: str = MANIFEST_FILE) -> EnsembleManifest:
    """Validates a decoded ``atoll_ensemble.json``.

    Raises:
        InvalidArgument: naming each field that is wrong and why.
    """
    try:
        return EnsembleManifest.model_validate(data)
    except ValidationError as error:
        raise InvalidArgument(f"{source}: {_field_errors(error)}") from None


def load_manifest(directory: Path) -> EnsembleManifest:
    """Reads and validates ``DIRECTORY/atoll_ensemble.json``.

    Raises:
        NotFound: no manifest there.
        InvalidArgument: not JSON, or a field is wrong (named in the message).
    """
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise NotFound(f"{directory}: no {MANIFEST_FILE}; not an Atoll ensemble directory")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"{path}: not readable JSON ({error})") from None
    return parse_manifest(data, str(path))


def listed_files(manifest: EnsembleManifest) -> dict[str, FileDigest]:
    """Every file the manifest lists, by path relative to the ensemble directory."""
    files: dict[str, FileDigest] = dict(manifest.other_files)
    if manifest.router.encoder is not None:
        files.update(manifest.router.encoder.files)
    centroids = manifest.router.centroids
    if centroids is not None:
        files[centroids.path] = FileDigest(sha256=centroids.sha256, size=centroids.size)
    if manifest.base is not None:
        files.update({f"{manifest.base.path}/{n}": d for n, d in manifest.base.files.items()})
    for expert in manifest.experts:
        if expert.present:
            files.update({f"{expert.path}/{n}": d for n, d in expert.files.items()})
    return files


def verify_files(directory: Path, manifest: EnsembleManifest) -> None:
    """Checks every listed file's size and sha256, and that expert, base and encoder folders
    hold nothing unlisted.

    Raises:
        VerificationFailed: showing the file and expected vs. actual size or digest.
    """
    for expert in manifest.experts:
        if expert.present and not (directory / expert.path).is_dir():
            raise VerificationFailed(
                f"{expert.path}: missing, but experts[{expert.index}] is listed as present"
            )
    listed = listed_files(manifest)
    for name, expected in sorted(listed.items()):
        path = directory / name
        if not path.is_file():
            raise VerificationFailed(f"{name}: listed in {MANIFEST_FILE} but missing")
        size = path.stat().st_size
        if size != expected.size:
            raise VerificationFailed(f"{name}: expected {expected.size} bytes, found {size}")
        actual = file_sha256(path)
        if actual != expected.sha256:
            raise VerificationFailed(
                f"{name}: expected sha256 {expected.sha256[:16]}.., got {actual[:16]}.."
            )
    # A file slipped into a loaded folder (an extra shard, a swapped config) would be read
    # without ever being checked.
    folders = [e.path for e in manifest.experts if e.present]
    if manifest.base is not None:
        folders.append(manifest.base.path)
    encoder = manifest.router.encoder
    if encoder is not None and encoder.directory is not None:
        folders.append(encoder.directory)
    for folder in folders:
        root = directory / folder
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            name = path.relative_to(directory).as_posix()
            if path.is_file() and name not in listed and name not in _SIGNATURE_FILES:
                raise VerificationFailed(f"{name}: not listed in {MANIFEST_FILE}")
