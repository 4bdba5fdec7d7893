"""Verifying an ensemble directory offline: what `atoll verify DIR` runs on one.

Checks, each failure naming the check and file:

1. ``atoll_ensemble.json`` parses (every field valid) and every file it lists has its size and
   sha256, with nothing unlisted in a loaded folder (:func:`protocol.ensemble_manifest.verify_files`);
2. the coordinator's ``model.sig`` over the whole directory: its certificate chains to the
   trusted federation CA and names ``spiffe://<federation>/coordinator``, and the directory
   holds exactly the signed files;
3. ``ensemble.sigstore.json`` is signed by the same key, names this manifest as its subject
   and lists, for every present expert, the root digest and provenance digest on disk;
4. every present expert's own ``model.sig`` and provenance (signed by a site of the
   federation, for the expert index it sits at, by the site the manifest names);
5. the centroids hold one row per expert, of the encoder's dimension.

Every file is hashed once (step 1); later steps reuse those digests.

Example::

    report = verify_ensemble(Path("ensemble"), trusted_ca_pem=Path("ca.pem").read_bytes())
    RoutedEnsemble.from_pretrained("ensemble", verifier=signature_verifier(ca_pem))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.digests import file_sha256
from protocol.ensemble_manifest import (
    MANIFEST_FILE,
    CentroidsSpec,
    EnsembleManifest,
    listed_files,
    load_manifest,
    verify_files,
)
from protocol.errors import VerificationFailed
from protocol.identity import coordinator_spiffe_id
from protocol.provenance import (
    ENSEMBLE_PREDICATE_TYPE,
    ENSEMBLE_STATEMENT_FILE,
    STATEMENT_TYPE,
    ProvenanceExpectations,
    open_statement,
    verify_expert,
)
from protocol.signing import PROVENANCE_FILE, verify_model

__all__ = ["signature_verifier", "verify_ensemble"]


def _centroid_shape(directory: Path, spec: CentroidsSpec) -> list[int]:
    from safetensors import safe_open

    try:
        with safe_open(str(directory / spec.path), framework="numpy") as handle:
            return list(handle.get_slice(spec.tensor).get_shape())
    except Exception as error:  # safetensors raises its own error types
        raise VerificationFailed(
            f"{spec.path}: no readable tensor {spec.tensor!r} ({error})"
        ) from None


def _check_statement(
    directory: Path, manifest: EnsembleManifest, key: ec.EllipticCurvePublicKey
) -> dict[str, Any]:
    path = directory / ENSEMBLE_STATEMENT_FILE
    if not path.is_file():
        raise VerificationFailed(f"{directory}: no {ENSEMBLE_STATEMENT_FILE}")
    statement = open_statement(path.read_bytes(), key, ENSEMBLE_STATEMENT_FILE)
    where = ENSEMBLE_STATEMENT_FILE
    try:
        if statement["_type"] != STATEMENT_TYPE:
            raise ValueError(f"_type is {statement['_type']!r}")
        if statement["predicateType"] != ENSEMBLE_PREDICATE_TYPE:
            raise ValueError(f"predicateType is {statement['predicateType']!r}")
        (subject,) = statement["subject"]
        claimed = subject["digest"]["sha256"]
        predicate = statement["predicate"]
        experts = {int(e["index"]): e for e in predicate["experts"]}
    except (KeyError, TypeError, ValueError) as error:
        raise VerificationFailed(f"{where}: not an atoll ensemble statement ({error})") from None
    actual = file_sha256(directory / MANIFEST_FILE)
    if claimed != actual:
        raise VerificationFailed(
            f"{where}: subject check: expected {MANIFEST_FILE} sha256 {claimed[:16]}.., "
            f"got {actual[:16]}.."
        )
    present = manifest.present_experts
    if sorted(experts) != present:
        raise VerificationFailed(
            f"{where}: expert check: the statement lists experts {sorted(experts)}, the "
            f"manifest's present experts are {present}"
        )
    for expert in manifest.experts:
        if not expert.present:
            continue
        entry = experts[expert.index]
        provenance = expert.files.get(PROVENANCE_FILE)
        pairs = [
            ("model root digest", entry["modelRootDigest"]["sha256"], expert.model_root_digest),
            (
                "provenance digest",
                entry["provenanceDigest"]["sha256"],
                provenance.sha256 if provenance else None,
            ),
            ("site", entry["site"], expert.site),
        ]
        for what, signed, listed in pairs:
            if signed != listed:
                raise VerificationFailed(
                    f"{where}: expert {expert.index} {what} check: signed {signed}, "
                    f"{MANIFEST_FILE} lists {listed}"
                )
    return dict(predicate)


def verify_ensemble(directory: Path, trusted_ca_pem: bytes) -> dict[str, Any]:
    """Fully verifies an ensemble directory (see the module docstring); returns a report.

    Raises:
        NotFound / InvalidArgument: no manifest, or a manifest field is wrong (named).
        VerificationFailed: naming the check and file, with expected vs. actual.
    """
    manifest = load_manifest(directory)
    verify_files(directory, manifest)
    listed = {name: digest.sha256 for name, digest in listed_files(manifest).items()}
    coordinator = coordinator_spiffe_id(manifest.federation_id)
    signed = verify_model(
        directory,
        trusted_ca_pem=trusted_ca_pem,
        expected_spiffe_id=coordinator,
        known_digests=listed,
    )
    key = signed.signer_certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # verify_model checked it
    predicate = _check_statement(directory, manifest, key)
    experts = []
    for expert in manifest.experts:
        if not expert.present:
            continue
        verified = verify_expert(
            directory / expert.path,
            trusted_ca_pem=trusted_ca_pem,
            expected=ProvenanceExpectations(
                expert_index=expert.index,
                model_root_digest=expert.model_root_digest,
                builder_id=expert.site,
            ),
            known_digests={name: d.sha256 for name, d in expert.files.items()},
        )
        experts.append(
            {
                "index": expert.index,
                "site": verified.model.signer_spiffe_id,
                "model_root_digest": verified.model.digests.root_sha256,
                "provenance": {
                    "builder_id": verified.provenance.builder_id,
                    **verified.provenance.run.to_json(),
                },
            }
        )
    encoder, centroids = manifest.router.encoder, manifest.router.centroids
    if encoder is not None and centroids is not None:
        shape = _centroid_shape(directory, centroids)
        if shape != [manifest.num_experts, encoder.dim]:
            raise VerificationFailed(
                f"{centroids.path}: expected {manifest.num_experts} centroids of dimension "
                f"{encoder.dim} (one per expert), got shape {shape}"
            )
    certificate = signed.signer_certificate
    return {
        "kind": "ensemble",
        "verified": True,
        "signer": {
            "spiffe_id": signed.signer_spiffe_id,
            "certificate_serial": f"{certificate.serial_number:x}",
            "subject": certificate.subject.rfc4514_string(),
        },
        "model_root_digest": signed.digests.root_sha256,
        "files": len(signed.digests.files),
        "federation": manifest.federation_id,
        "version": predicate.get("version"),
        "plan_digest": manifest.plan_digest,
        "experts": [e["index"] for e in experts],
        "missing_experts": manifest.missing_experts,
        "router": {
            "tau": manifest.router.tau,
            "top_k": manifest.router.top_k,
            "text_only": str(manifest.router.text_only),
        },
        "expert_provenance": experts,
    }


def signature_verifier(trusted_ca_pem: bytes) -> Callable[[Path, EnsembleManifest], None]:
    """A ``RoutedEnsemble.from_pretrained(verifier=...)`` that runs :func:`verify_ensemble`."""

    def verify(directory: Path, _manifest: EnsembleManifest) -> None:
        verify_ensemble(directory, trusted_ca_pem)

    return verify
