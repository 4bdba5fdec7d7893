"""The experts of an ensemble: which accepted upload becomes each expert, and its checked copy.

Each accepted file is read once: copied and hashed in the same pass
(:func:`protocol.digests.copy_and_hash`), so the bytes in the ensemble are the bytes whose
digest was checked against the upload record. Those digests then serve the signature check
(the signed statement must list exactly them), the manifest's file list and the coordinator's
own signature and the served artifacts, instead of reading the files again: for 7B experts
that was tens of GB of extra reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator import audit_report
from coordinator.state import StateDir
from coordinator.store import Store
from coordinator.upload_writer import upload_files_dir
from protocol.digests import copy_and_hash, folder_digests
from protocol.ensemble_manifest import expert_path
from protocol.errors import FailedPrecondition, VerificationFailed
from protocol.provenance import ProvenanceExpectations, verify_expert
from protocol.signing import PROVENANCE_FILE

__all__ = ["CopiedExpert", "ExpertChoice", "choose_experts", "copy_expert"]


@dataclass(frozen=True)
class ExpertChoice:
    """The accepted upload that becomes expert ``index``."""

    index: int
    site: str
    upload_id: str
    log_index: int
    model_root_digest: str


@dataclass(frozen=True)
class CopiedExpert:
    """One expert as copied into the ensemble.

    Attributes:
        entry: Its ``experts[]`` entry of ``atoll_ensemble.json``.
        statement: Its entry of the coordinator's signed statement.
    """

    entry: dict[str, Any]
    statement: dict[str, Any]


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


def _copy_files(
    state: StateDir, store: Store, choice: ExpertChoice, target: Path
) -> dict[str, str]:
    """Copies and hashes the accepted files of one upload, checking each against its record;
    returns their sha256 by path relative to ``target``."""
    record = store.get_upload(choice.upload_id)
    if record is None or record.state != "accepted":
        raise FailedPrecondition(f"expert {choice.index}: upload {choice.upload_id} not accepted")
    source = upload_files_dir(state, record.upload_id)
    copied: dict[str, str] = {}
    for item in record.files:
        destination = target / item.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            digest = copy_and_hash(source / item.path, destination)
        except OSError as error:
            raise VerificationFailed(
                f"expert {choice.index}: accepted file {item.path} of upload "
                f"{record.upload_id} is unreadable ({error})"
            ) from None
        if digest.size != item.size or digest.sha256 != item.sha256:
            found = (
                f"{digest.size} bytes"
                if digest.size != item.size
                else f"sha256 {digest.sha256[:16]}.."
            )
            raise VerificationFailed(
                f"expert {choice.index}: accepted file {item.path} of upload {record.upload_id} "
                f"changed since acceptance: expected {item.size} bytes, sha256 "
                f"{item.sha256[:16]}.., found {found}"
            )
        copied[item.path] = digest.sha256
    return copied


def copy_expert(
    state: StateDir, store: Store, choice: ExpertChoice, staging: Path, ca_pem: bytes
) -> CopiedExpert:
    """Copies expert ``choice.index`` into ``staging`` and verifies its signature and
    provenance against the digests of the copy.

    Raises:
        FailedPrecondition: the upload is no longer accepted.
        VerificationFailed: a file changed since acceptance, or a signature does not verify.
    """
    path = expert_path(choice.index)
    copied = _copy_files(state, store, choice, staging / path)
    site = store.get_site(choice.site)
    verified = verify_expert(
        staging / path,
        trusted_ca_pem=ca_pem,
        expected=ProvenanceExpectations(
            expert_index=choice.index, builder_id=site.spiffe_id if site is not None else None
        ),
        known_digests=copied,
    )
    root = verified.model.digests.root_sha256
    files = folder_digests(staging / path, known=copied)
    entry = {
        "index": choice.index,
        "path": path,
        "present": True,
        "kind": "lora" if "adapter_config.json" in files else "full",
        "model_root_digest": root,
        "site": verified.model.signer_spiffe_id,
        "files": files,
    }
    statement = {
        "index": choice.index,
        "site": verified.model.signer_spiffe_id,
        "modelRootDigest": {"sha256": root},
        "provenanceDigest": {"sha256": files[PROVENANCE_FILE]["sha256"]},
        "uploadId": choice.upload_id,
        "auditLogIndex": choice.log_index,
    }
    return CopiedExpert(entry, statement)
