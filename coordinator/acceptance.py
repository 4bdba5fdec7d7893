"""Accepting an expert: its signature and provenance, checked against what was issued.

:func:`provenance_check` builds the :data:`coordinator.upload.AcceptanceCheck` that
``Coordinator.open`` registers. After the upload's sizes and digests matched its manifest, it
runs :func:`protocol.provenance.verify_expert` on the received directory with

* the federation CA as the only trust anchor, and the uploading site's *current* key as the
  only acceptable signer (not revoked; its current certificate, or an earlier one of the same
  key and identity, since renewal keeps the key);
* the expectations the coordinator issued: builder = the site's SPIFFE id, the expert it
  holds, the digest of its assignment document as issued now, the recipe and base-model
  digests of the federation recipe, and the sha256 of ``partition/expert-<k>.json`` when the
  plan has one.

Each failure is one line naming the check and the file (``model.sig: file check: missing file
config.json ...``), which the upload records as its rejection reason.
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coordinator.assignment import current_assignment
from coordinator.federation_recipe import current_recipe
from coordinator.store import Store, UploadRecord
from coordinator.upload import AcceptanceCheck
from protocol.errors import AtollError, FailedPrecondition, PermissionDenied
from protocol.provenance import ProvenanceExpectations, verify_expert
from protocol.shard_manifest import shard_artifact_name
from protocol.signing import SIGNATURE_FILE, signer_certificate
from protocol.x509 import load_certificate, uri_sans


def expectations_for(store: Store, federation: str, site: str) -> ProvenanceExpectations:
    """What the provenance of ``site``'s expert must state, from what the coordinator issued.

    Raises:
        FailedPrecondition / PermissionDenied: The site holds no assignment, or the federation
            has no recipe.
    """
    record = store.get_site(site)
    if record is None:
        raise PermissionDenied(f"site check: {site!r} is not enrolled")
    issued = current_assignment(store, federation, site)
    recipe = current_recipe(store)
    if issued is None or recipe is None:
        raise FailedPrecondition(
            f"assignment check: site {site!r} holds no expert under the current plan and recipe"
        )
    shard = store.get_artifact(shard_artifact_name(issued.record.expert_index))
    return ProvenanceExpectations(
        builder_id=record.spiffe_id,
        expert_index=issued.record.expert_index,
        assignment_digest=issued.digest,
        recipe_digest=recipe.sha256,
        base_model_digest=recipe.base_model.digest,
        shard_manifest_digest=shard.sha256 if shard is not None else None,
    )


def check_expert(
    store: Store, federation: str, ca_pem: bytes, upload: UploadRecord, directory: Path
) -> str | None:
    """None when the uploaded expert is acceptable, else the reason (check and file)."""
    site = store.get_site(upload.site)
    if site is None:
        return f"site check: {upload.site!r} is not enrolled"
    if site.revoked_at is not None:
        return (
            f"revocation check: site {site.name!r} was revoked at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(site.revoked_at))}; "
            "its experts are refused"
        )
    try:
        expected = expectations_for(store, federation, site.name)
        if expected.expert_index != upload.expert_index:
            return (
                f"assignment check: site {site.name!r} holds expert {expected.expert_index}, "
                f"the upload is for expert {upload.expert_index}"
            )
        verify_expert(
            directory,
            trusted_ca_pem=ca_pem,
            expected_certificate=_signer(directory, site.cert_pem),
            expected=expected,
            # Commit has already checked every received file against these digests.
            known_digests={f.path: f.sha256 for f in upload.files},
        )
    except AtollError as error:
        # The reason goes to the site and the audit log: name files within the upload, not
        # where this coordinator keeps them.
        return str(error).replace(f"{directory}/", "").replace(str(directory), "the upload")
    return None


def _signer(directory: Path, cert_pem: str) -> x509.Certificate:
    """The certificate the expert must be signed with: the site's current one, or an earlier
    certificate of the same key and identity (a renewal between signing and upload keeps the
    key; see coordinator.certificates)."""
    current = load_certificate(cert_pem.encode(), "site certificate")
    try:
        leaf = signer_certificate((directory / SIGNATURE_FILE).read_bytes())
    except (OSError, AtollError):
        return current  # verify_expert names what is wrong with the signature
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    same_key = leaf.public_key().public_bytes(der, spki) == current.public_key().public_bytes(
        der, spki
    )
    return leaf if same_key and uri_sans(leaf) == uri_sans(current) else current


def provenance_check(store: Store, federation: str, ca_pem: bytes) -> AcceptanceCheck:
    """The acceptance check ``Coordinator.open`` registers (see the module docstring)."""

    def check(upload: UploadRecord, directory: Path) -> str | None:
        return check_expert(store, federation, ca_pem, upload, directory)

    return check
