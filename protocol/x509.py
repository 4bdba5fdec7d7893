"""Small helpers over ``cryptography`` for the federation's P-256 keys and certificates."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.errors import InvalidArgument, VerificationFailed


def new_p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_private(path: Path, data: bytes) -> None:
    """Writes a secret file readable by its owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_private_key(path: Path, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Loads a PEM P-256 private key (``password``: of an encrypted one), naming the file
    when it is not one: the one loader of every key Atoll holds."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=password)
    except (OSError, ValueError, TypeError) as error:
        raise InvalidArgument(f"{path}: not a readable PEM private key ({error})") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise InvalidArgument(f"{path}: expected an EC P-256 (secp256r1) private key")
    return key


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise InvalidArgument(f"{what}: not a PEM certificate ({error})") from error


def certificate_sha256(cert: x509.Certificate) -> str:
    """Hex sha256 of the DER certificate: what an enrolment token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI SAN of ``cert``: the one reader of the extension that names an identity."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id(cert: x509.Certificate) -> str:
    """The one ``spiffe://`` URI SAN of ``cert`` (a site's, reader's or the coordinator's
    identity).

    Raises:
        VerificationFailed: ``cert`` carries none, or more than one.
    """
    uris = uri_sans(cert)
    spiffe = [uri for uri in uris if uri.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise VerificationFailed(
            f"certificate {cert.subject.rfc4514_string()}: expected exactly one "
            f"spiffe:// URI SAN, found {len(spiffe)} ({', '.join(uris) or 'none'})"
        )
    return spiffe[0]


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``cert`` was issued and signed by ``issuer`` (ECDSA with its own hash)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
