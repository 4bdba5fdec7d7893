"""`coordinator assemble`: the accepted experts, the plan's router and the coordinator's
signature, as one ensemble directory consumers download.

Once every expert 0..K-1 has an accepted upload (the latest accepted one counts), assembly
builds ``STATE/ensemble/v<N>/`` in a temporary sibling and renames it into place::

    atoll_ensemble.json           the manifest (ensemble/manifest.py), every file's digest
    router/centroids.safetensors  the plan's centroids, byte for byte
    router/encoder/<model>.json   the plan's open_clip config (+ weights, --encoder-weights)
    base/                         the recipe's served base checkpoint, for LoRA experts only
    experts/expert-<k>/           each accepted upload, byte for byte, with its signatures
    README.md                     the model card (coordinator/model_card.py)
    ensemble.sigstore.json        DSSE in-toto statement: each expert's root and provenance
                                  digests, signed with the coordinator's key
    model.sig                     OpenSSF model signature over the whole directory, signed
                                  by the coordinator (SAN spiffe://<federation>/coordinator)

Then every file is served to readers (``ensemble/<path>``), the ensemble is published, and
``assembled`` + ``published`` are recorded in the audit log.

Each file is hashed once, as it is copied (:mod:`coordinator.ensemble_experts`); the
manifest, the coordinator's signatures (:mod:`coordinator.ensemble_statement`) and the served
artifacts reuse those digests. Experts are refused when an accepted file no longer matches its
upload record or its signature; experts of sites revoked since their acceptance are flagged and refused, and only
``--allow-partial`` assembles without them (recorded as missing, the router renormalised over
the others).

Example::

    result = assemble(state, store, AssemblyConfig(tau=50.0, top_k=1))
    print(result.directory, result.missing)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coordinator import audit
from coordinator.artifacts import check_artifact_name, register_artifact
from coordinator.ensemble_experts import ExpertChoice, choose_experts, copy_expert
from coordinator.ensemble_statement import ensemble_statement, sign_ensemble
from coordinator.federation_recipe import current_recipe
from coordinator.model_card import model_card
from coordinator.router_files import cluster_priors, router_centroids, router_encoder
from coordinator.state import StateDir
from coordinator.store import EnsembleRecord, Store
from protocol.canonical import canonical_digest
from protocol.digests import copy_folder, file_entry, file_sha256
from protocol.ensemble_manifest import (
    MANIFEST_FILE,
    TextOnlyStrategy,
    expert_path,
    listed_files,
    parse_manifest,
)
from protocol.errors import AtollError, FailedPrecondition, InvalidArgument, NotFound
from protocol.partition_plan import PLAN_FILE, PartitionPlan, load_plan

__all__ = ["AssemblyConfig", "AssemblyResult", "ExpertChoice", "assemble", "choose_experts"]

ARTIFACT_PREFIX = "ensemble/"


@dataclass(frozen=True)
class AssemblyConfig:
    """The router settings and what to do about missing experts (validated by :meth:`check`).

    Attributes:
        tau: The router's inverse temperature (> 0).
        top_k: Experts mixed per sample (1..present experts).
        text_only: How prompts without an image are routed.
        allow_partial: Assemble without missing (or revoked) experts.
        encoder_weights: The plan's encoder weights file or CLIP folder, when it is not
            where the plan's spec points.
        fit_tau: Held-out data (an ``atoll eval`` file): fit tau on it instead of ``tau``.
        fit_image_root: Where its images are (default: the data file's folder).
    """

    tau: float = 50.0
    top_k: int = 1
    text_only: TextOnlyStrategy = TextOnlyStrategy.POSTERIOR
    allow_partial: bool = False
    encoder_weights: Path | None = None
    fit_tau: Path | None = None
    fit_image_root: Path | None = None

    def check(self) -> None:
        if not (self.tau > 0 and self.tau != float("inf")):
            raise InvalidArgument(f"--tau: expected a finite number > 0, got {self.tau}")
        if self.top_k < 1:
            raise InvalidArgument(f"--top-k: expected an integer >= 1, got {self.top_k}")
        if self.fit_tau is not None and not self.fit_tau.is_file():
            raise NotFound(f"--fit-tau {self.fit_tau}: no such file")


@dataclass(frozen=True)
class AssemblyResult:
    """What :func:`assemble` built and published."""

    version: str
    directory: Path
    manifest_sha256: str
    experts: list[ExpertChoice]
    missing: list[int]
    dropped_revoked: list[int]
    files: int
    tau: float = 50.0
    tau_fit: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "directory": str(self.directory),
            "manifest_sha256": self.manifest_sha256,
            "experts": [asdict(e) for e in self.experts],
            "missing_experts": self.missing,
            "dropped_revoked": self.dropped_revoked,
            "files": self.files,
            "tau": self.tau,
            "tau_fit": self.tau_fit,
        }


def _read_plan(state: StateDir, store: Store) -> PartitionPlan:
    record = store.get_plan()
    if record is None:
        raise FailedPrecondition("no partition plan yet: run `coordinator partition` first")
    path = state.partition_dir / PLAN_FILE
    try:
        plan = load_plan(path)
    except AtollError as error:
        raise FailedPrecondition(f"{error} (re-run `coordinator partition`)") from None
    if plan.digest != record.digest:
        raise FailedPrecondition(
            f"{path}: digest {plan.digest[:12]}.. is not the recorded plan "
            f"{record.digest[:12]}..; re-run `coordinator partition`"
        )
    return plan


def _architecture(expert_dir: Path) -> str:
    try:
        config = json.loads((expert_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "causal-lm"
    kind = str(config.get("model_type", ""))
    if kind == "llava":
        return "llava"
    return "internvl" if kind.startswith("internvl") else "causal-lm"


def _next_version(state: StateDir) -> str:
    numbers = [0]
    if state.ensembles_dir.is_dir():
        for path in state.ensembles_dir.iterdir():
            if path.name.startswith("v") and path.name[1:].isdigit():
                numbers.append(int(path.name[1:]))
    return f"v{max(numbers) + 1}"


def assemble(
    state: StateDir, store: Store, config: AssemblyConfig, now: float | None = None
) -> AssemblyResult:
    """Builds, signs and publishes the ensemble (see the module docstring).

    Raises:
        InvalidArgument: a bad router setting (named).
        FailedPrecondition: no plan, or experts missing or revoked without ``allow_partial``.
        VerificationFailed: an accepted file or signature no longer matches.
    """
    config.check()
    federation = state.federation()
    plan = _read_plan(state, store)
    num_experts = plan.num_experts
    usable, revoked = choose_experts(store, num_experts)
    missing = [k for k in range(num_experts) if k not in usable]
    if missing and not config.allow_partial:
        flagged = [f"{k} (site {revoked[k].site} revoked)" for k in missing if k in revoked]
        absent = [str(k) for k in missing if k not in revoked]
        parts = []
        if absent:
            parts.append(f"expert(s) {', '.join(absent)} have no accepted upload")
        if flagged:
            parts.append(f"expert(s) {', '.join(flagged)} come from revoked sites")
        raise FailedPrecondition(
            f"cannot assemble: {'; '.join(parts)} (--allow-partial assembles without them)"
        )
    if not usable:
        raise FailedPrecondition("cannot assemble: no expert has an accepted upload")
    if config.top_k > len(usable):
        raise InvalidArgument(
            f"--top-k: expected 1..{len(usable)} (the experts present), got {config.top_k}"
        )
    ca_pem = state.ca_cert.read_bytes()
    version = _next_version(state)
    state.ensembles_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=state.ensembles_dir))
    try:
        entries: list[dict[str, Any]] = []
        chosen = [usable[k] for k in sorted(usable)]
        statement_experts = []
        for index in range(num_experts):
            choice = usable.get(index)
            if choice is None:
                entries.append(
                    {"index": index, "path": expert_path(index), "present": False, "files": {}}
                )
                continue
            copied = copy_expert(state, store, choice, staging, ca_pem)
            entries.append(copied.entry)
            statement_experts.append(copied.statement)
        base = None
        if any(e.get("kind") == "lora" for e in entries):
            base = _copy_base(state, store, staging)
        first = staging / expert_path(chosen[0].index)
        architecture = _architecture(staging / "base" if base else first)
        encoder, centroids = None, None
        if plan.encoder is not None:
            encoder = router_encoder(plan, staging, config.encoder_weights)
            centroids = router_centroids(state, staging, num_experts, encoder["dim"])
        elif architecture != "causal-lm" or config.text_only is TextOnlyStrategy.CLIP_TEXT:
            raise FailedPrecondition(
                f"the plan was made from a text-only data set (no image router), so the "
                f"experts must be causal LMs routed without CLIP, not {architecture} with "
                f"--text-only {config.text_only}"
            )
        created = datetime.fromtimestamp(time.time() if now is None else now, UTC)
        router: dict[str, Any] = {
            "encoder": encoder,
            "centroids": centroids,
            "tau": config.tau,
            "top_k": config.top_k,
            "text_only": str(config.text_only),
            "cluster_priors": cluster_priors(plan, num_experts),
        }
        manifest: dict[str, Any] = {
            "format": "atoll-ensemble",
            "format_version": 1,
            "federation_id": federation,
            "plan_digest": plan.digest,
            "architecture": architecture,
            "created_at": created.isoformat().replace("+00:00", "Z"),
            "router": router,
            "experts": entries,
            "allow_partial": bool(missing),
            "missing_experts": missing,
            "base": base,
            "other_files": {},
        }
        if config.fit_tau is not None:
            from coordinator.tau_fit import fit_router_tau

            fit = fit_router_tau(staging, manifest, config.fit_tau, config.fit_image_root)
            router["tau"], router["tau_fit"] = fit.pop("tau"), fit
        (staging / "README.md").write_text(
            model_card(
                federation,
                version,
                plan,
                router,
                config.fit_tau is not None,
                chosen,
                missing,
                revoked,
            )
        )
        manifest["other_files"] = {"README.md": file_entry(staging / "README.md")}
        parsed = parse_manifest(manifest)  # the schema consumers load with: fail here
        manifest_path = staging / MANIFEST_FILE
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        manifest_sha256 = file_sha256(manifest_path)
        # Every digest the manifest lists was taken from the copy in staging as it was
        # written: the signatures and the served artifacts reuse them (nothing is read twice).
        known = {name: d.sha256 for name, d in listed_files(parsed).items()}
        known[MANIFEST_FILE] = manifest_sha256
        statement = ensemble_statement(
            federation, version, plan.digest, manifest_sha256, statement_experts, missing
        )
        known = sign_ensemble(state, staging, statement, known)
        final = state.ensembles_dir / version
        names = _artifact_names(staging)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = AssemblyResult(
        version=version,
        directory=final,
        manifest_sha256=manifest_sha256,
        experts=chosen,
        missing=missing,
        dropped_revoked=sorted(k for k in revoked if k in missing),
        files=len(names),
        tau=router["tau"],
        tau_fit=router.get("tau_fit"),
    )
    _publish(state, store, final, names, result, config, known)
    return result


def _copy_base(state: StateDir, store: Store, staging: Path) -> dict[str, Any]:
    recipe = current_recipe(store)
    source = state.root / "base"
    if recipe is None or not recipe.base_model.served or not source.is_dir():
        raise FailedPrecondition(
            "LoRA experts need the base checkpoint, but the recipe's base is not kept by the "
            "coordinator (a base larger than the serve limit stays at the sites)"
        )
    copied = copy_folder(source, staging / "base")
    return {"path": "base", "files": {name: d.entry() for name, d in copied.items()}}


def _artifact_names(directory: Path) -> list[str]:
    names = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            names.append(
                check_artifact_name(ARTIFACT_PREFIX + path.relative_to(directory).as_posix())
            )
    return names


def _publish(
    state: StateDir,
    store: Store,
    directory: Path,
    names: list[str],
    result: AssemblyResult,
    config: AssemblyConfig,
    known: dict[str, str],
) -> None:
    details = {
        "version": result.version,
        "manifest_sha256": result.manifest_sha256,
        "experts": [
            {
                "expert": e.index,
                "site": e.site,
                "upload_id": e.upload_id,
                "model_root_digest": e.model_root_digest,
            }
            for e in result.experts
        ],
        "missing_experts": result.missing,
        "router": {"tau": result.tau, "top_k": config.top_k, "text_only": str(config.text_only)},
    }
    audit.record_assembled(store, details)
    store.remove_artifacts(ARTIFACT_PREFIX)
    for name in names:
        relative = name.removeprefix(ARTIFACT_PREFIX)
        register_artifact(
            state, store, name, directory / relative, audience="readers", sha256=known.get(relative)
        )
    manifest_json = (directory / MANIFEST_FILE).read_text()
    store.publish_ensemble(EnsembleRecord(manifest_json, tuple(names), time.time()))
    audit.record_published(
        store,
        {
            "version": result.version,
            "manifest_sha256": result.manifest_sha256,
            "files": len(names),
            "digest": canonical_digest(sorted(names)),
        },
    )
    audit.Auditor.open(state, store).checkpoint()
