"""Which SuperNodes may receive an Atoll token: those whose Flower node key the operator listed.

With ``flower-superlink --enable-supernode-auth`` a SuperNode connects only with a key
registered by ``flwr supernode register`` and proves it holds the private half; the SuperLink
then reports that key in each node's ``NodeInfo.public_key`` (PEM). ``authorized-keys`` lists
the keys whose labs were invited (OpenSSH lines, the files given to ``flwr supernode
register``). Without node auth on the SuperLink every SuperNode registers itself with a key
of its own making, so a listed key proves nothing: keep node auth on.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load(path: Path) -> set[bytes]:
    """The listed keys (DER SubjectPublicKeyInfo); a bad line names its number."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"run config authorized-keys {path}: {error.strerror}") from None
    keys: set[bytes] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            keys.add(_spki(serialization.load_ssh_public_key(line.strip().encode())))
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{path}:{number}: expected an OpenSSH public key line ({error})"
            ) from None
    if not keys:
        raise ValueError(f"run config authorized-keys {path}: no keys listed")
    return keys


def is_listed(public_key_pem: bytes, authorized: set[bytes]) -> bool:
    """Whether a node's key (as the SuperLink reports it, PEM) is one of ``authorized``."""
    try:
        return _spki(serialization.load_pem_public_key(public_key_pem)) in authorized
    except (ValueError, TypeError):
        return False
