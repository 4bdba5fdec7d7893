"""Signing an expert directory: ``model.sig``, an OpenSSF Model Signing v1.0 bundle.

A site signs its final checkpoint with the P-256 key it enrolled with. The signature is a
Sigstore bundle holding a DSSE envelope over an in-toto statement whose predicate lists every
file of the directory with its sha256 (``files`` serialisation, not shards) and whose subject
digest, the *root digest*, is the sha256 over those file digests in path order. The bundle
carries the site certificate and the federation CA, so an auditor checks it with the standard
tool and no network::

    model_signing verify certificate DIR --signature DIR/model.sig --certificate_chain ca.pem

That tool checks the chain and the files, not *which* site signed; :func:`verify_model` also
returns the signer's SPIFFE id and can pin the expected certificate. A Sigstore bundle holds
either a certificate chain or a public-key hint, never both, so ``model_signing verify key``
cannot read ``model.sig`` as is; :func:`public_key_bundle` writes the same envelope (same
signature bytes) with a key hint instead::

    model_signing verify key DIR --signature key.sig --public_key site.pub

Two files are left out of the signature: ``model.sig`` itself and ``provenance.sigstore.json``
(which signs the root digest, see :mod:`protocol.provenance`).

Example::

    digests = sign_model(expert_dir, private_key_path=key, certificate_path=crt, ca_path=ca)
    verified = verify_model(expert_dir, trusted_ca_pem=ca.read_bytes())
    assert verified.digests.root_sha256 == digests.root_sha256
    print(verified.signer_spiffe_id)  # spiffe://<federation>/site/<name>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.digests import hash_folder
from protocol.dsse import dsse_pae, ecdsa_verify, public_key_id
from protocol.errors import InvalidArgument, VerificationFailed
from protocol.x509 import load_private_key, spiffe_id

__all__ = [
    "ALLOWED_UNSIGNED",
    "PROVENANCE_FILE",
    "SIGNATURE_FILE",
    "ModelDigests",
    "VerifiedModel",
    "hash_model_files",
    "public_key_bundle",
    "read_signed_digests",
    "root_digest",
    "sign_model",
    "verify_model",
]

SIGNATURE_FILE = "model.sig"
PROVENANCE_FILE = "provenance.sigstore.json"
# What a model.sig may leave unsigned: the two signature files, and the git paths that the
# model_signing tool ignores by default (it records them in the signature).
ALLOWED_UNSIGNED = frozenset(
    {SIGNATURE_FILE, PROVENANCE_FILE, ".git", ".github", ".gitignore", ".gitattributes"}
)

_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_MODEL_SIGNING_PREDICATE = "https://model_signing/signature/v1.0"


@dataclass(frozen=True)
class ModelDigests:
    """What ``model.sig`` signs.

    Attributes:
        root_sha256: Hex sha256 over the file digests in path order: the model-signing
            subject digest, which provenance and the audit log refer to.
        files: Relative POSIX path -> hex sha256, for every signed file.
    """

    root_sha256: str
    files: Mapping[str, str]


@dataclass(frozen=True)
class VerifiedModel:
    """The outcome of :func:`verify_model`.

    Attributes:
        signer_spiffe_id: The URI SAN of the signing certificate.
        signer_certificate: The certificate whose key signed ``model.sig``.
        digests: The signed (and re-hashed, matching) file digests.
    """

    signer_spiffe_id: str
    signer_certificate: x509.Certificate
    digests: ModelDigests


# -- hashing ---------------------------------------------------------------------------------


def hash_model_files(
    model_dir: Path,
    *,
    unsigned: frozenset[str] = ALLOWED_UNSIGNED,
    max_workers: int | None = None,
    known: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Hex sha256 of every file ``model.sig`` signs: all below ``model_dir`` except the
    ``unsigned`` top-level names (hashed by :func:`protocol.digests.hash_folder`).

    Args:
        model_dir: The expert directory.
        unsigned: Relative paths left out (a directory name leaves out all below it).
        max_workers: Threads; default cores + 4.
        known: Digests the caller has already established for some files (e.g. the
            coordinator hashed them as they arrived); those files are not read again.

    Returns:
        Relative POSIX path -> hex sha256, in path order.

    Raises:
        InvalidArgument: ``model_dir`` is not a directory, or holds a symlink or special file.
    """
    if not model_dir.is_dir():
        raise InvalidArgument(f"{model_dir}: expected a model directory")
    files = hash_folder(model_dir, skip=unsigned, known=known, max_workers=max_workers)
    return {name: digest.sha256 for name, digest in files.items()}


def root_digest(files: Mapping[str, str]) -> str:
    """The model-signing root digest: sha256 over the raw file digests in path order.

    Paths sort as model_signing sorts them (component by component), which differs from a
    plain string sort for names such as ``a-b/c`` and ``a/b``.
    """
    hasher = hashlib.sha256()
    for name in sorted(files, key=lambda name: PurePosixPath(name).parts):
        hasher.update(bytes.fromhex(files[name]))
    return hasher.hexdigest()


# -- signing ---------------------------------------------------------------------------------


def sign_model(
    model_dir: Path,
    *,
    private_key_path: Path,
    certificate_path: Path,
    ca_path: Path,
    max_workers: int | None = None,
    known: Mapping[str, str] | None = None,
) -> ModelDigests:
    """Writes ``model_dir/model.sig``, signed by the site key, carrying its certificate chain.

    Uses the ``model_signing`` library (certificate signer, ``files`` serialisation, sha256),
    so the standard CLI verifies the result.

    Args:
        model_dir: The expert directory (a ``save_pretrained`` output).
        private_key_path: The site's PEM P-256 private key.
        certificate_path: The site certificate (PEM) for that key.
        ca_path: The federation CA certificate(s) (PEM) to carry in the bundle.
        max_workers: Hashing threads; default cores + 4.
        known: Hex sha256 of files the caller wrote and hashed itself (relative POSIX path
            -> digest; the coordinator's assembly hashed every file as it copied it): signed
            as given, not read again. Only for files nobody else could have changed since.

    Returns:
        The signed digests (root digest and per-file sha256).

    Raises:
        InvalidArgument: A key, certificate or the directory is unusable, or the key does not
            match the certificate.
    """
    from model_signing import signing

    load_private_key(private_key_path)  # a clear error before the library's
    hashing_config = (
        _hashing_config(model_dir, known or {})
        .use_file_serialization(hashing_algorithm="sha256", max_workers=max_workers)
        .set_ignored_paths(paths=[SIGNATURE_FILE, PROVENANCE_FILE], ignore_git_paths=True)
    )
    signature_path = model_dir / SIGNATURE_FILE
    try:
        signing.Config().use_certificate_signer(
            private_key=private_key_path,
            signing_certificate=certificate_path,
            certificate_chain=[ca_path],
        ).set_hashing_config(hashing_config).sign(model_dir, signature_path)
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"signing {model_dir} failed: {error}") from error
    return read_signed_digests(signature_path.read_bytes())


def _hashing_config(model_dir: Path, known: Mapping[str, str]) -> Any:
    """model_signing's hashing configuration, answering the ``known`` digests without reading
    their files. The statement it signs is the one a full hashing gives (tested), since a
    ``files`` manifest holds only each path and its digest."""
    from model_signing import hashing
    from model_signing._hashing.hashing import Digest

    class KnownDigests(hashing.Config):
        # The library's one hook for how a file is hashed (private, hence the test).
        def _build_file_hasher_factory(self, *args: Any, **kwargs: Any) -> Any:
            build = super()._build_file_hasher_factory(*args, **kwargs)

            def factory(path: Path) -> Any:
                hasher = build(path)
                # The library also builds one for Path() to learn the digest's name.
                relative = path.relative_to(model_dir).as_posix() if path != Path() else ""
                if relative in known:
                    digest = Digest(hasher.digest_name, bytes.fromhex(known[relative]))
                    hasher.compute = lambda: digest
                return hasher

            return factory

    return KnownDigests()


def public_key_bundle(signature: bytes) -> bytes:
    """``model.sig`` re-labelled for ``model_signing verify key``.

    The DSSE envelope and its signature are unchanged; only the verification material
    becomes a public-key hint (sha256 of the signer's PEM public key) instead of the chain.

    Args:
        signature: The bytes of a certificate-chain ``model.sig``.

    Returns:
        The bytes of an equivalent key bundle.
    """
    bundle = _parse_bundle(signature)
    leaf = _bundle_certificates(bundle)[0]
    pem = leaf.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bundle["verificationMaterial"] = {
        "publicKey": {"hint": hashlib.sha256(pem).hexdigest()},
        "tlogEntries": [],
    }
    return json.dumps(bundle).encode("utf-8")


# -- verification ----------------------------------------------------------------------------


def _parse_bundle(signature: bytes) -> dict[str, Any]:
    try:
        bundle = json.loads(signature)
    except ValueError as error:
        raise VerificationFailed(f"{SIGNATURE_FILE}: not JSON ({error})") from error
    if not isinstance(bundle, dict) or bundle.get("mediaType") != _BUNDLE_MEDIA_TYPE:
        found = bundle.get("mediaType") if isinstance(bundle, dict) else type(bundle).__name__
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: expected a Sigstore bundle of media type "
            f"{_BUNDLE_MEDIA_TYPE}, got {found!r}"
        )
    return bundle


def _bundle_certificates(bundle: dict[str, Any]) -> list[x509.Certificate]:
    try:
        raw = bundle["verificationMaterial"]["x509CertificateChain"]["certificates"]
        certificates = [
            x509.load_der_x509_certificate(base64.b64decode(c["rawBytes"])) for c in raw
        ]
    except (KeyError, TypeError, ValueError, binascii.Error) as error:
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: expected a certificate chain in verificationMaterial "
            f"({type(error).__name__}: {error})"
        ) from error
    if not certificates:
        raise VerificationFailed(f"{SIGNATURE_FILE}: the certificate chain is empty")
    return certificates


def _envelope(bundle: dict[str, Any]) -> tuple[str, bytes, bytes]:
    try:
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = envelope["signatures"]
        if len(signatures) != 1:
            raise ValueError(f"expected 1 signature, found {len(signatures)}")
        sig = base64.b64decode(signatures[0]["sig"], validate=True)
        return str(envelope["payloadType"]), payload, sig
    except (KeyError, TypeError, ValueError, binascii.Error) as error:
        raise VerificationFailed(f"{SIGNATURE_FILE}: malformed DSSE envelope ({error})") from error


def signer_certificate(signature: bytes) -> x509.Certificate:
    """The leaf certificate a ``model.sig`` bundle carries, *unverified* (callers pass it on
    to :func:`verify_model` as ``expected_certificate`` only after their own checks)."""
    return _bundle_certificates(_parse_bundle(signature))[0]


def read_signed_digests(signature: bytes) -> ModelDigests:
    """The digests a ``model.sig`` claims, checked for internal consistency only.

    Does not check the signature; use :func:`verify_model` for that.

    Raises:
        VerificationFailed: The bundle is malformed, or its resources do not hash to the root.
    """
    payload_type, payload, _ = _envelope(_parse_bundle(signature))
    digests, _ = _parse_statement(payload_type, payload)
    return digests


def _parse_statement(payload_type: str, payload: bytes) -> tuple[ModelDigests, list[str]]:
    if payload_type != _IN_TOTO_PAYLOAD_TYPE:
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: expected payloadType {_IN_TOTO_PAYLOAD_TYPE}, got {payload_type!r}"
        )
    try:
        statement = json.loads(payload)
        if statement["_type"] != _STATEMENT_TYPE:
            raise ValueError(f"_type is {statement['_type']!r}, expected {_STATEMENT_TYPE}")
        if statement["predicateType"] != _MODEL_SIGNING_PREDICATE:
            raise ValueError(
                f"predicateType is {statement['predicateType']!r}, "
                f"expected {_MODEL_SIGNING_PREDICATE}"
            )
        (subject,) = statement["subject"]
        claimed_root = subject["digest"]["sha256"]
        serialization_ = statement["predicate"]["serialization"]
        if serialization_["method"] != "files" or serialization_["hash_type"] != "sha256":
            raise ValueError(
                f"serialization is {serialization_['method']}/{serialization_['hash_type']}, "
                "expected files/sha256"
            )
        ignored = [str(path) for path in serialization_.get("ignore_paths", [])]
        files: dict[str, str] = {}
        hasher = hashlib.sha256()
        for resource in statement["predicate"]["resources"]:
            if resource["algorithm"] != "sha256":
                raise ValueError(f"{resource['name']}: algorithm {resource['algorithm']!r}")
            hasher.update(bytes.fromhex(resource["digest"]))
            files[resource["name"]] = resource["digest"]
    except (KeyError, TypeError, ValueError) as error:
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: not a model_signing v1.0 statement ({error})"
        ) from error
    if hasher.hexdigest() != claimed_root:
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: root digest check: expected sha256 {claimed_root[:16]}.. over "
            f"the listed files, got {hasher.hexdigest()[:16]}.."
        )
    return ModelDigests(root_sha256=claimed_root, files=files), ignored


def _check_chain(
    leaf: x509.Certificate,
    untrusted: list[x509.Certificate],
    trusted_ca_pem: bytes,
    at: datetime | None,
) -> None:
    from OpenSSL import crypto

    try:
        cas = x509.load_pem_x509_certificates(trusted_ca_pem)
    except ValueError as error:
        raise InvalidArgument(f"trusted CA: not PEM certificates ({error})") from error
    store = crypto.X509Store()
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    # Like `model_signing verify certificate`: without a timestamp authority, the signature
    # is judged at the time the certificate was issued, so it outlives the certificate.
    store.set_time(at or leaf.not_valid_before_utc)
    context = crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        [crypto.X509.from_cryptography(c) for c in untrusted],
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as error:
        trusted = ", ".join(ca.subject.rfc4514_string() for ca in cas)
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: certificate chain check: {leaf.subject.rfc4514_string()} "
            f"(issuer {leaf.issuer.rfc4514_string()}) does not chain to the trusted CA "
            f"{trusted}: {error}"
        ) from error
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.digital_signature:
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: signing certificate {leaf.subject.rfc4514_string()} "
            "does not allow digitalSignature"
        )


def _compare_files(signed: Mapping[str, str], actual: Mapping[str, str]) -> None:
    missing = sorted(set(signed) - set(actual))
    extra = sorted(set(actual) - set(signed))
    problems = [
        f"missing file {name} (signed with sha256 {signed[name][:16]}..)" for name in missing
    ]
    problems += [f"extra file {name} (not in {SIGNATURE_FILE})" for name in extra]
    problems += [
        f"expected sha256 {signed[name][:16]}.. for {name}, got {actual[name][:16]}.."
        for name in sorted(set(signed) & set(actual))
        if signed[name] != actual[name]
    ]
    if problems:
        raise VerificationFailed(f"{SIGNATURE_FILE}: file check: " + "; ".join(problems))


def verify_model(
    model_dir: Path,
    *,
    trusted_ca_pem: bytes,
    expected_certificate: x509.Certificate | None = None,
    expected_spiffe_id: str | None = None,
    at: datetime | None = None,
    max_workers: int | None = None,
    known_digests: Mapping[str, str] | None = None,
) -> VerifiedModel:
    """Verifies ``model_dir/model.sig`` and every file it signs.

    Checks, in order: the bundle parses; the signing certificate is ``expected_certificate``
    (when given: e.g. the uploading site's mTLS certificate); it chains to
    ``trusted_ca_pem``; the DSSE signature verifies under its key; the statement is a
    model-signing v1.0 ``files``/sha256 manifest whose root digest matches its files; the
    files on disk are exactly the signed ones with the signed digests; the signer's SPIFFE id
    is ``expected_spiffe_id`` (when given).

    Args:
        model_dir: The expert directory.
        trusted_ca_pem: The federation CA certificate(s), PEM.
        expected_certificate: When given, the signer must be this certificate.
        expected_spiffe_id: When given, the signer's URI SAN must equal it.
        at: Time at which to check the chain; default the signing certificate's notBefore.
        max_workers: Hashing threads; default cores + 4.

    Returns:
        The signer and the verified digests.

    Raises:
        VerificationFailed: Naming the check that failed and, for files, expected vs. actual.
    """
    signature_path = model_dir / SIGNATURE_FILE
    try:
        signature = signature_path.read_bytes()
    except FileNotFoundError as error:
        raise VerificationFailed(f"{model_dir}: no {SIGNATURE_FILE}") from error
    bundle = _parse_bundle(signature)
    chain = _bundle_certificates(bundle)
    leaf = chain[0]
    if expected_certificate is not None and leaf != expected_certificate:
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: signer check: signed by certificate serial "
            f"{leaf.serial_number:x} ({leaf.subject.rfc4514_string()}), expected serial "
            f"{expected_certificate.serial_number:x} "
            f"({expected_certificate.subject.rfc4514_string()})"
        )
    _check_chain(leaf, chain[1:], trusted_ca_pem, at)
    payload_type, payload, sig = _envelope(bundle)
    public_key = leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise VerificationFailed(f"{SIGNATURE_FILE}: the signing certificate's key is not EC")
    if not ecdsa_verify(public_key, sig, dsse_pae(payload_type, payload)):
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: signature check: the DSSE signature does not verify under the "
            f"key of {leaf.subject.rfc4514_string()} (keyid {public_key_id(public_key)[:16]}..)"
        )
    digests, ignored = _parse_statement(payload_type, payload)
    not_allowed = sorted(set(ignored) - ALLOWED_UNSIGNED)
    if not_allowed:
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: leaves {', '.join(not_allowed)} unsigned; only "
            f"{', '.join(sorted(ALLOWED_UNSIGNED))} may be"
        )
    unsigned = frozenset(ignored) | {SIGNATURE_FILE, PROVENANCE_FILE}
    actual = hash_model_files(
        model_dir, unsigned=unsigned, max_workers=max_workers, known=known_digests
    )
    _compare_files(digests.files, actual)
    signer = spiffe_id(leaf)
    if expected_spiffe_id is not None and signer != expected_spiffe_id:
        raise VerificationFailed(
            f"{SIGNATURE_FILE}: signer identity check: expected {expected_spiffe_id}, got {signer}"
        )
    return VerifiedModel(signer_spiffe_id=signer, signer_certificate=leaf, digests=digests)
