"""Provenance of an expert: ``provenance.sigstore.json``, SLSA Provenance v1 in a DSSE envelope.

Who trained which expert, from which base model, on which data, with which recipe. The file is
a DSSE envelope (payloadType ``application/vnd.in-toto+json``) signed with the site's P-256 key
(ECDSA-sha256 over the DSSE PAE; ``keyid`` = sha256 of the DER public key) around the in-toto
Statement v1 of :mod:`protocol.provenance_statement`. This module signs and verifies it, with
the expert's ``model.sig``.

The envelope verifies with any DSSE implementation, e.g. ``securesystemslib``::

    Envelope.from_dict(json.load(f)).verify([SSlibKey.from_crypto(pub, keyid=...)], 1)

Example::

    run = TrainingRun(expert_index=2, assignment_digest=..., recipe_digest=..., ...)
    signed = sign_expert(expert_dir, run, private_key_path=key, certificate_path=crt,
                         ca_path=ca)
    verified = verify_expert(expert_dir, trusted_ca_pem=ca_pem,
                             expected=ProvenanceExpectations(expert_index=2))
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.canonical import canonical_json
from protocol.dsse import dsse_pae, ecdsa_sign, ecdsa_verify, public_key_id
from protocol.errors import InvalidArgument, VerificationFailed

# The statement's names stay importable from here: this is expert provenance's public surface.
from protocol.provenance_statement import (
    BUILD_TYPE,
    SLSA_PREDICATE_TYPE,
    STATEMENT_TYPE,
    ExpertProvenance,
    TrainingRun,
    parse_statement,
    provenance_statement,
)
from protocol.signing import (
    PROVENANCE_FILE,
    VerifiedModel,
    sign_model,
    verify_model,
)
from protocol.x509 import load_private_key, spiffe_id

__all__ = [
    "BUILD_TYPE",
    "ENSEMBLE_PREDICATE_TYPE",
    "ENSEMBLE_STATEMENT_FILE",
    "PAYLOAD_TYPE",
    "SLSA_PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "ExpertProvenance",
    "ProvenanceExpectations",
    "TrainingRun",
    "VerifiedExpert",
    "open_statement",
    "provenance_statement",
    "sign_expert",
    "sign_provenance",
    "sign_statement",
    "verify_expert",
    "verify_provenance",
]

PAYLOAD_TYPE = "application/vnd.in-toto+json"
# The coordinator's statement over a published ensemble: subject = atoll_ensemble.json, and
# for every expert its model-signing root digest and the sha256 of its provenance file.
ENSEMBLE_STATEMENT_FILE = "ensemble.sigstore.json"
ENSEMBLE_PREDICATE_TYPE = "https://atoll.dev/ensemble/v1"


@dataclass(frozen=True)
class ProvenanceExpectations:
    """Values a verifier insists on; ``None`` leaves a field unchecked."""

    model_root_digest: str | None = None
    builder_id: str | None = None
    expert_index: int | None = None
    assignment_digest: str | None = None
    recipe_digest: str | None = None
    base_model_digest: str | None = None
    shard_manifest_digest: str | None = None


@dataclass(frozen=True)
class VerifiedExpert:
    """An expert directory whose ``model.sig`` and provenance both verified."""

    model: VerifiedModel
    provenance: ExpertProvenance


def sign_statement(
    statement: Mapping[str, Any], private_key: ec.EllipticCurvePrivateKey
) -> dict[str, Any]:
    """The DSSE envelope (a JSON object) of an in-toto ``statement`` (canonical JSON
    payload), signed with ``private_key`` (``keyid`` = sha256 of its DER public key)."""
    payload = canonical_json(dict(statement))
    signature = ecdsa_sign(private_key, dsse_pae(PAYLOAD_TYPE, payload))
    return {
        "payload": base64.b64encode(payload).decode("ascii"),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [
            {
                "keyid": public_key_id(private_key.public_key()),
                "sig": base64.b64encode(signature).decode("ascii"),
            }
        ],
    }


def sign_provenance(
    provenance: ExpertProvenance, private_key: ec.EllipticCurvePrivateKey
) -> dict[str, Any]:
    """The DSSE envelope (a JSON object) of ``provenance``, signed with ``private_key``."""
    return sign_statement(provenance_statement(provenance), private_key)


def _check_expected(provenance: ExpertProvenance, expected: ProvenanceExpectations) -> None:
    actual = {
        "model_root_digest": provenance.model_root_digest,
        "builder_id": provenance.builder_id,
        **{f.name: getattr(provenance.run, f.name) for f in fields(TrainingRun)},
    }
    for field in fields(ProvenanceExpectations):
        want = getattr(expected, field.name)
        if want is not None and actual[field.name] != want:
            raise VerificationFailed(
                f"{PROVENANCE_FILE}: {field.name.replace('_', ' ')} check: expected {want}, "
                f"provenance claims {actual[field.name]}"
            )


def open_statement(
    envelope: bytes, public_key: ec.EllipticCurvePublicKey, source: str = PROVENANCE_FILE
) -> Any:
    """The in-toto statement inside a DSSE envelope, once its signature verified under
    ``public_key``.

    Raises:
        VerificationFailed: Naming ``source`` and the check (envelope, signature, payload).
    """
    try:
        document = json.loads(envelope)
        payload_type = document["payloadType"]
        payload = base64.b64decode(document["payload"], validate=True)
        signatures = [
            (s["keyid"], base64.b64decode(s["sig"], validate=True)) for s in document["signatures"]
        ]
    except (KeyError, TypeError, ValueError, binascii.Error) as error:
        raise VerificationFailed(
            f"{source}: not a DSSE envelope ({type(error).__name__}: {error})"
        ) from error
    if payload_type != PAYLOAD_TYPE:
        raise VerificationFailed(
            f"{source}: expected payloadType {PAYLOAD_TYPE}, got {payload_type!r}"
        )
    keyid = public_key_id(public_key)
    matching = [sig for sig_keyid, sig in signatures if sig_keyid == keyid]
    if not matching:
        found = ", ".join(f"{k[:16]}.." for k, _ in signatures) or "none"
        raise VerificationFailed(
            f"{source}: signature check: no signature with keyid {keyid[:16]}.. (found {found})"
        )
    if not any(ecdsa_verify(public_key, sig, dsse_pae(payload_type, payload)) for sig in matching):
        raise VerificationFailed(
            f"{source}: signature check: the DSSE signature does not verify under "
            f"keyid {keyid[:16]}.."
        )
    try:
        return json.loads(payload)
    except ValueError as error:
        raise VerificationFailed(f"{source}: payload is not JSON ({error})") from error


def verify_provenance(
    envelope: bytes,
    public_key: ec.EllipticCurvePublicKey,
    expected: ProvenanceExpectations | None = None,
) -> ExpertProvenance:
    """Verifies a provenance envelope under ``public_key`` and returns what it states.

    Args:
        envelope: The bytes of ``provenance.sigstore.json``.
        public_key: The signer's key (from its certificate).
        expected: Values the statement must carry (expert index, digests, builder...).

    Returns:
        The statement's content.

    Raises:
        VerificationFailed: Naming the check (envelope, signature, statement, or the expected
            field with expected vs. claimed values).
    """
    provenance = parse_statement(open_statement(envelope, public_key))
    if expected is not None:
        _check_expected(provenance, expected)
    return provenance


def sign_expert(
    model_dir: Path,
    run: TrainingRun,
    *,
    private_key_path: Path,
    certificate_path: Path,
    ca_path: Path,
    max_workers: int | None = None,
) -> ExpertProvenance:
    """Signs an expert directory: writes ``model.sig``, then ``provenance.sigstore.json``.

    The builder id is the SPIFFE id of the site certificate; the subject is the root digest
    that ``model.sig`` signs.

    Args:
        model_dir: The expert directory (final checkpoint).
        run: What the site agent records about the training run.
        private_key_path: The site's PEM P-256 private key.
        certificate_path: The site certificate (PEM).
        ca_path: The federation CA certificate (PEM).
        max_workers: Hashing threads; default cores + 4.

    Returns:
        The provenance written.
    """
    try:
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"{certificate_path}: not a PEM certificate ({error})") from error
    builder_id = spiffe_id(certificate)
    digests = sign_model(
        model_dir,
        private_key_path=private_key_path,
        certificate_path=certificate_path,
        ca_path=ca_path,
        max_workers=max_workers,
    )
    provenance = ExpertProvenance(
        model_root_digest=digests.root_sha256, builder_id=builder_id, run=run
    )
    envelope = sign_provenance(provenance, load_private_key(private_key_path))
    (model_dir / PROVENANCE_FILE).write_text(json.dumps(envelope, indent=2) + "\n")
    return provenance


def verify_expert(
    model_dir: Path,
    *,
    trusted_ca_pem: bytes,
    expected_certificate: x509.Certificate | None = None,
    expected: ProvenanceExpectations | None = None,
    at: datetime | None = None,
    max_workers: int | None = None,
    known_digests: Mapping[str, str] | None = None,
) -> VerifiedExpert:
    """Verifies ``model.sig`` and ``provenance.sigstore.json`` of an expert directory.

    Beyond :func:`protocol.signing.verify_model`, checks that the provenance is signed by the
    same key, names the model's root digest as its subject and the signer's SPIFFE id as its
    builder, and carries the ``expected`` values.

    Args:
        model_dir: The expert directory.
        trusted_ca_pem: The federation CA certificate(s), PEM.
        expected_certificate: When given, the signer must be this certificate.
        expected: Values the provenance must carry; its ``builder_id`` also pins the signer.
        at: Time at which to check the certificate chain; default the signing certificate's
            notBefore (as ``model_signing verify certificate`` does).
        max_workers: Hashing threads; default cores + 4.
        known_digests: File digests the caller already established (not read again).

    Returns:
        The verified model signature and provenance.

    Raises:
        VerificationFailed: Naming the check and file that failed.
    """
    expected = expected or ProvenanceExpectations()
    model = verify_model(
        model_dir,
        trusted_ca_pem=trusted_ca_pem,
        expected_certificate=expected_certificate,
        expected_spiffe_id=expected.builder_id,
        at=at,
        max_workers=max_workers,
        known_digests=known_digests,
    )
    try:
        envelope = (model_dir / PROVENANCE_FILE).read_bytes()
    except FileNotFoundError as error:
        raise VerificationFailed(f"{model_dir}: no {PROVENANCE_FILE}") from error
    public_key = model.signer_certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # verify_model checked it
    if expected.model_root_digest not in (None, model.digests.root_sha256):
        raise VerificationFailed(
            f"{PROVENANCE_FILE}: model root digest check: expected "
            f"{expected.model_root_digest}, model.sig signs {model.digests.root_sha256}"
        )
    pinned = ProvenanceExpectations(
        **{
            **{f.name: getattr(expected, f.name) for f in fields(ProvenanceExpectations)},
            "model_root_digest": model.digests.root_sha256,
            "builder_id": model.signer_spiffe_id,
        }
    )
    provenance = verify_provenance(envelope, public_key, pinned)
    return VerifiedExpert(model=model, provenance=provenance)
