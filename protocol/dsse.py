"""The signature primitives of every signed format here: ECDSA P-256 with sha256, the key id
that names a key, and DSSE's pre-authentication encoding (what a DSSE signature covers).

``model.sig`` (:mod:`protocol.signing`), provenance and the ensemble statement
(:mod:`protocol.provenance`) are DSSE envelopes; audit-log checkpoints and checkpoint notes
sign with the same ECDSA.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["dsse_pae", "ecdsa_sign", "ecdsa_verify", "public_key_id"]


def public_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Hex sha256 of the DER SubjectPublicKeyInfo: the ``keyid`` of our DSSE signatures."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def dsse_pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the bytes a DSSE signature covers."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def ecdsa_sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """DER ECDSA signature with sha256 (what DSSE and securesystemslib expect for P-256)."""
    return private_key.sign(data, ec.ECDSA(hashes.SHA256()))


def ecdsa_verify(public_key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid ECDSA-sha256 signature of ``data``."""
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
