"""Audit-log checkpoints as C2SP signed notes, the text form transparency-log tools read.

A C2SP ``tlog-checkpoint`` is three lines (origin, tree size, base64 RFC 9162 root hash); a
C2SP ``signed-note`` appends a blank line and signature lines
``— <key name> <base64(key id || signature)>``. The coordinator signs with its P-256 key
(ECDSA with SHA-256 over the checkpoint text, DER signature), whose key id is the first four
bytes of the sha256 of its DER SubjectPublicKeyInfo, as Sigstore's Rekor does. The origin
(and key name) is the log id without its scheme: ``<federation>/coordinator``.

Example::

    note = sign_note(log_id, size, root, coordinator_key)
    size, root = open_note(note, coordinator_public_key, log_id)
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.dsse import ecdsa_sign, ecdsa_verify
from protocol.errors import VerificationFailed

__all__ = ["note_origin", "open_note", "sign_note"]

_DASH = "\u2014 "


def note_origin(log_id: str) -> str:
    """The checkpoint origin (and key name) of an audit log: its id without the scheme."""
    return log_id.removeprefix("spiffe://")


def _key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()[:4]


def _body(origin: str, size: int, root: bytes) -> str:
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


def sign_note(log_id: str, size: int, root: bytes, private_key: ec.EllipticCurvePrivateKey) -> str:
    """The signed-note text of the head ``(size, root)`` of log ``log_id``."""
    origin = note_origin(log_id)
    body = _body(origin, size, root)
    signature = _key_id(private_key.public_key()) + ecdsa_sign(private_key, body.encode())
    return f"{body}\n{_DASH}{origin} {base64.b64encode(signature).decode()}\n"


def open_note(text: str, public_key: ec.EllipticCurvePublicKey, log_id: str) -> tuple[int, bytes]:
    """Verifies a signed checkpoint note of log ``log_id``; returns ``(size, root)``.

    Raises:
        VerificationFailed: Not a checkpoint note, another log, or no valid signature by
            ``public_key``.
    """
    origin = note_origin(log_id)
    body, blank, signatures = text.rpartition("\n\n")
    if not blank:
        raise VerificationFailed("checkpoint note: no blank line before its signatures")
    body += "\n"
    lines = body.split("\n")
    if len(lines) < 4 or lines[0] != origin:
        raise VerificationFailed(
            f"checkpoint note: origin {lines[0]!r}, expected {origin!r} (another log?)"
        )
    try:
        size = int(lines[1])
        root = base64.b64decode(lines[2], validate=True)
    except (ValueError, binascii.Error) as error:
        raise VerificationFailed(f"checkpoint note: malformed size or root ({error})") from None
    if size < 0 or len(root) != 32 or str(size) != lines[1]:
        raise VerificationFailed("checkpoint note: size or root hash out of range")
    key_id = _key_id(public_key)
    for line in signatures.splitlines():
        name, _, encoded = line.removeprefix(_DASH).rpartition(" ")
        if not line.startswith(_DASH) or name != origin:
            continue
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (ValueError, binascii.Error):
            continue
        if signature[:4] == key_id:
            if not ecdsa_verify(public_key, signature[4:], body.encode()):
                raise VerificationFailed(
                    f"checkpoint note of {origin} at size {size}: signature check failed"
                )
            return size, root
    raise VerificationFailed(
        f"checkpoint note of {origin}: no signature by the coordinator key {key_id.hex()}"
    )
