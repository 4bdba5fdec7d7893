"""The coordinator's signatures over an assembled ensemble.

``ensemble.sigstore.json`` is a DSSE in-toto statement naming the manifest's digest and, for
each expert, its model root digest, provenance digest, upload and audit-log index, signed with
the coordinator's key. Then ``model.sig`` (an OpenSSF model signature by the coordinator's
certificate, SAN ``spiffe://<federation>/coordinator``) covers the whole directory, the
statement included.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator.federation import signing_certificate
from coordinator.state import StateDir
from protocol.ensemble_manifest import MANIFEST_FILE
from protocol.identity import coordinator_spiffe_id
from protocol.provenance import (
    ENSEMBLE_PREDICATE_TYPE,
    ENSEMBLE_STATEMENT_FILE,
    STATEMENT_TYPE,
    sign_statement,
)
from protocol.signing import sign_model
from protocol.x509 import load_private_key

__all__ = ["ensemble_statement", "sign_ensemble"]


def ensemble_statement(
    federation: str,
    version: str,
    plan_digest: str,
    manifest_sha256: str,
    experts: list[dict[str, Any]],
    missing: list[int],
) -> dict[str, Any]:
    """The in-toto statement ``ensemble.sigstore.json`` signs."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": MANIFEST_FILE, "digest": {"sha256": manifest_sha256}}],
        "predicateType": ENSEMBLE_PREDICATE_TYPE,
        "predicate": {
            "federation": federation,
            "coordinator": coordinator_spiffe_id(federation),
            "version": version,
            "planDigest": {"sha256": plan_digest},
            "experts": experts,
            "missingExperts": missing,
        },
    }


def sign_ensemble(
    state: StateDir, staging: Path, statement: dict[str, Any], known: Mapping[str, str]
) -> dict[str, str]:
    """Writes ``ensemble.sigstore.json``, then ``model.sig`` over everything (the statement
    included).

    Args:
        state: The coordinator's state (its signing key and certificate).
        staging: The ensemble directory, still private to the coordinator.
        statement: From :func:`ensemble_statement`.
        known: Hex sha256 of the files assembly wrote and hashed as it wrote them (relative
            paths); ``model.sig`` signs those as they are instead of reading them again.

    Returns:
        ``known`` and the statement file's digest.
    """
    envelope = sign_statement(statement, load_private_key(state.signing_key))
    text = (json.dumps(envelope, indent=2) + "\n").encode()
    (staging / ENSEMBLE_STATEMENT_FILE).write_bytes(text)
    signed = {**known, ENSEMBLE_STATEMENT_FILE: hashlib.sha256(text).hexdigest()}
    sign_model(
        staging,
        private_key_path=state.signing_key,
        certificate_path=signing_certificate(state),
        ca_path=state.ca_cert,
        known=signed,
    )
    return signed
