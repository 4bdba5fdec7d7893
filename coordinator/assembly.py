"""`coordinator assemble`: the accepted experts, the plan's router and the coordinator's
signature, as one ensemble directory consumers download.

Once every expert 0..K-1 has an accepted upload (the latest accepted one counts), assembly
builds ``STATE/ensemble/v<N>/`` in a temporary sibling and renames it into place::

    atoll_ensemble.json           the manifest (ensemble/manifest.py), every file's digest
    router/centroids.safetensors  the plan's centroids, byte for byte
    router/encoder/<model>.json   the plan's open_clip config (+ weights, --encoder-weights)
    base/                         the recipe's served base checkpoint, for LoRA experts only
    experts/expert-<k>/           each accepted upload, byte for byte, with its signatures
    README.md                     the model card: provenance, balance, router settings
    ensemble.sigstore.json        DSSE in-toto statement: each expert's root and provenance
                                  digests, signed with the coordinator's key
    model.sig                     OpenSSF model signature over the whole directory, signed
                                  by the coordinator (SAN spiffe://<federation>/coordinator)

Then every file is served to readers (``ensemble/<path>``), the ensemble is published, and
``assembled`` + ``published`` are recorded in the audit log.

Experts are refused when an accepted file no longer matches its upload record or its
signature; experts of sites revoked since their acceptance are flagged and refused, and only
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

from coordinator import audit, audit_report
from coordinator.artifacts import check_artifact_name, register_artifact
from coordinator.federation import signing_certificate
from coordinator.federation_recipe import current_recipe
from coordinator.router_files import cluster_priors, router_centroids, router_encoder
from coordinator.state import StateDir
from coordinator.store import EnsembleRecord, Store
from coordinator.upload_writer import upload_files_dir
from protocol.canonical import canonical_digest
from protocol.digests import file_entry, file_sha256, folder_digests
from protocol.ensemble_manifest import (
    MANIFEST_FILE,
    TextOnlyStrategy,
    expert_path,
    parse_manifest,
)
from protocol.errors import FailedPrecondition, InvalidArgument, NotFound, VerificationFailed
from protocol.identity import coordinator_spiffe_id
from protocol.provenance import (
    ENSEMBLE_PREDICATE_TYPE,
    ENSEMBLE_STATEMENT_FILE,
    STATEMENT_TYPE,
    ProvenanceExpectations,
    sign_statement,
    verify_expert,
)
from protocol.signing import PROVENANCE_FILE, sign_model
from protocol.x509 import load_private_key

__all__ = ["AssemblyConfig", "AssemblyResult", "ExpertChoice", "assemble", "choose_experts"]

PAPER = "Maschan, Qu, Liu (2026), Decentralized Autoregressive Generation, arXiv:2601.03184"
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
class ExpertChoice:
    """The accepted upload that becomes expert ``index``."""

    index: int
    site: str
    upload_id: str
    log_index: int
    model_root_digest: str


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


def choose_experts(
    store: Store, num_experts: int
) -> tuple[dict[int, ExpertChoice], dict[int, ExpertChoice]]:
    """The latest accepted upload of every expert: ``(usable, revoked)`` by index, where
    ``revoked`` are experts whose site was revoked since (flagged, never assembled)."""
    latest: dict[int, audit_report.ProvenanceRow] = {}
    for row in audit_report.provenance_table(store):
        if 0 <= row.expert < num_experts:
            latest[row.expert] = row  # log order: a later acceptance replaces an earlier one
    usable: dict[int, ExpertChoice] = {}
    revoked: dict[int, ExpertChoice] = {}
    for index, row in sorted(latest.items()):
        choice = ExpertChoice(index, row.site, row.upload_id, row.log_index, row.model_root_digest)
        (revoked if row.site_revoked else usable)[index] = choice
    return usable, revoked


def _read_plan(state: StateDir, store: Store) -> dict[str, Any]:
    plan = store.get_plan()
    if plan is None:
        raise FailedPrecondition("no partition plan yet: run `coordinator partition` first")
    path = state.partition_dir / "plan.json"
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FailedPrecondition(f"{path}: unreadable partition plan ({error})") from None
    if document.get("digest") != plan.digest:
        raise FailedPrecondition(
            f"{path}: digest {str(document.get('digest'))[:12]}.. is not the recorded plan "
            f"{plan.digest[:12]}..; re-run `coordinator partition`"
        )
    return dict(document)


def _copy_expert(state: StateDir, store: Store, choice: ExpertChoice, target: Path) -> int:
    """Copies the accepted files of one upload, checking each against its record; returns
    the number of files."""
    record = store.get_upload(choice.upload_id)
    if record is None or record.state != "accepted":
        raise FailedPrecondition(f"expert {choice.index}: upload {choice.upload_id} not accepted")
    source = upload_files_dir(state, record.upload_id)
    for item in record.files:
        destination = target / item.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source / item.path, destination)
        except OSError as error:
            raise VerificationFailed(
                f"expert {choice.index}: accepted file {item.path} of upload "
                f"{record.upload_id} is unreadable ({error})"
            ) from None
        size = destination.stat().st_size
        actual = file_sha256(destination) if size == item.size else ""
        if size != item.size or actual != item.sha256:
            found = f"{size} bytes" if size != item.size else f"sha256 {actual[:16]}.."
            raise VerificationFailed(
                f"expert {choice.index}: accepted file {item.path} of upload {record.upload_id} "
                f"changed since acceptance: expected {item.size} bytes, sha256 "
                f"{item.sha256[:16]}.., found {found}"
            )
    return len(record.files)


def _architecture(expert_dir: Path) -> str:
    try:
        config = json.loads((expert_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "causal-lm"
    kind = str(config.get("model_type", ""))
    if kind == "llava":
        return "llava"
    return "internvl" if kind.startswith("internvl") else "causal-lm"


def _model_card(
    federation: str,
    version: str,
    plan: dict[str, Any],
    config: AssemblyConfig,
    tau: float,
    experts: list[ExpertChoice],
    missing: list[int],
    revoked: dict[int, ExpertChoice],
) -> str:
    lines = [
        f"# Atoll routed ensemble — federation `{federation}`, {version}",
        "",
        f"A routed ensemble of {plan['num_experts']} experts, each trained at one site on one "
        "cluster of the data, implementing the method of:",
        "",
        f"> {PAPER}",
        "",
        "Load it with `ensemble.RoutedEnsemble.from_pretrained(DIR)`; check it offline with "
        "`atoll verify DIR --trust ca.pem`.",
        "",
        "## Router",
        "",
        f"`p(S_k | image) = softmax_k(tau * cos(f(image), c_k))`, tau = {tau:g}"
        f"{' (fitted on held-out data)' if config.fit_tau else ''}, "
        f"top-k = {config.top_k}, text-only prompts: `{config.text_only}`.",
        (
            f"Feature model: `{plan['encoder'].get('model')}` ({plan['encoder'].get('backend')}); "
            if plan["encoder"] is not None
            else "No image router: the experts were trained on a text-only data set; "
        )
        + f"plan digest `{plan['digest']}`.",
        "",
        "## Provenance",
        "",
        "| expert | site | model root digest | upload | audit log index |",
        "|---|---|---|---|---|",
    ]
    for choice in experts:
        lines.append(
            f"| {choice.index} | {choice.site} | `{choice.model_root_digest[:16]}..` | "
            f"{choice.upload_id} | {choice.log_index} |"
        )
    for index in missing:
        why = f"site {revoked[index].site} revoked" if index in revoked else "no accepted expert"
        lines.append(f"| {index} | MISSING ({why}) | - | - | - |")
    lines += [
        "",
        "## Balance",
        "",
        "| expert | unique images | samples | image samples | text-only |",
        "|---|---|---|---|---|",
    ]
    for row in plan.get("clusters", []):
        lines.append(
            f"| {row['expert']} | {row.get('unique_images', '-')} | {row.get('samples', '-')} | "
            f"{row.get('image_samples', '-')} | {row.get('text_only', '-')} |"
        )
    lines += ["", "Signed by the coordinator: `model.sig` + `ensemble.sigstore.json`.", ""]
    return "\n".join(lines)


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
    num_experts = int(plan["num_experts"])
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
            target = staging / expert_path(index)
            _copy_expert(state, store, choice, target)
            site = store.get_site(choice.site)
            builder = site.spiffe_id if site is not None else None
            verified = verify_expert(
                target,
                trusted_ca_pem=ca_pem,
                expected=ProvenanceExpectations(expert_index=index, builder_id=builder),
            )
            root = verified.model.digests.root_sha256
            files = folder_digests(target)
            entries.append(
                {
                    "index": index,
                    "path": expert_path(index),
                    "present": True,
                    "kind": "lora" if "adapter_config.json" in files else "full",
                    "model_root_digest": root,
                    "site": verified.model.signer_spiffe_id,
                    "files": files,
                }
            )
            statement_experts.append(
                {
                    "index": index,
                    "site": verified.model.signer_spiffe_id,
                    "modelRootDigest": {"sha256": root},
                    "provenanceDigest": {"sha256": files[PROVENANCE_FILE]["sha256"]},
                    "uploadId": choice.upload_id,
                    "auditLogIndex": choice.log_index,
                }
            )
        base = None
        if any(e.get("kind") == "lora" for e in entries):
            base = _copy_base(state, store, staging)
        first = staging / expert_path(chosen[0].index)
        architecture = _architecture(staging / "base" if base else first)
        encoder, centroids = None, None
        if plan["encoder"] is not None:
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
            "plan_digest": plan["digest"],
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
            _model_card(federation, version, plan, config, router["tau"], chosen, missing, revoked)
        )
        manifest["other_files"] = {"README.md": file_entry(staging / "README.md")}
        parse_manifest(manifest)  # the schema consumers load with: fail here, not there
        manifest_path = staging / MANIFEST_FILE
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        manifest_sha256 = file_sha256(manifest_path)
        _sign(
            state, staging, federation, version, plan, manifest_sha256, statement_experts, missing
        )
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
    _publish(state, store, final, names, manifest_path.name, result, config)
    return result


def _copy_base(state: StateDir, store: Store, staging: Path) -> dict[str, Any]:
    recipe = current_recipe(store)
    source = state.root / "base"
    if recipe is None or not recipe["base_model"]["served"] or not source.is_dir():
        raise FailedPrecondition(
            "LoRA experts need the base checkpoint, but the recipe's base is not kept by the "
            "coordinator (a base larger than the serve limit stays at the sites)"
        )
    shutil.copytree(source, staging / "base")
    return {"path": "base", "files": folder_digests(staging / "base")}


def _sign(
    state: StateDir,
    staging: Path,
    federation: str,
    version: str,
    plan: dict[str, Any],
    manifest_sha256: str,
    experts: list[dict[str, Any]],
    missing: list[int],
) -> None:
    """Writes ``ensemble.sigstore.json``, then ``model.sig`` over everything (the statement
    included)."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": MANIFEST_FILE, "digest": {"sha256": manifest_sha256}}],
        "predicateType": ENSEMBLE_PREDICATE_TYPE,
        "predicate": {
            "federation": federation,
            "coordinator": coordinator_spiffe_id(federation),
            "version": version,
            "planDigest": {"sha256": plan["digest"]},
            "experts": experts,
            "missingExperts": missing,
        },
    }
    envelope = sign_statement(statement, load_private_key(state.signing_key))
    (staging / ENSEMBLE_STATEMENT_FILE).write_text(json.dumps(envelope, indent=2) + "\n")
    sign_model(
        staging,
        private_key_path=state.signing_key,
        certificate_path=signing_certificate(state),
        ca_path=state.ca_cert,
    )


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
    manifest_name: str,
    result: AssemblyResult,
    config: AssemblyConfig,
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
        path = directory / name.removeprefix(ARTIFACT_PREFIX)
        register_artifact(state, store, name, path, audience="readers")
    manifest_json = (directory / manifest_name).read_text()
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
