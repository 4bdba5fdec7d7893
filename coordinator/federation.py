"""Creating and loading a federation: its state directory, CA, signing key and store."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from coordinator.ca import CertificateAuthority, load_ca
from coordinator.certificates import DEFAULT_LIFETIME_DAYS, set_lifetime_days
from coordinator.state import StateDir, open_store
from coordinator.store import SCHEMA_VERSION
from protocol.errors import AlreadyExists
from protocol.identity import check_name
from protocol.x509 import (
    load_private_key,
    new_p256_key,
    private_key_pem,
    public_key_pem,
    write_private,
    write_public,
)


def init_federation(
    root: Path, federation: str, cert_days: int = DEFAULT_LIFETIME_DAYS
) -> StateDir:
    """Creates a new federation in ``root`` (which may exist but must hold no federation).

    Everything is built in a temporary sibling directory and moved into place, so a failure
    leaves nothing half-written and an existing federation is never touched.
    """
    check_name(federation, "federation name")
    state = StateDir(root)
    if state.exists() or state.store_path.exists() or state.ca_key.exists():
        raise AlreadyExists(
            f"{root} already holds a federation; refusing to overwrite it "
            "(choose another --state directory)"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".init-", dir=root))
    try:
        tmp = StateDir(staging)
        ca = CertificateAuthority.create(federation)
        write_private(tmp.ca_key, private_key_pem(ca.key))
        write_public(tmp.ca_cert, ca.cert.public_bytes(serialization.Encoding.PEM))
        signing = new_p256_key()
        write_private(tmp.signing_key, private_key_pem(signing))
        write_public(tmp.signing_pub, public_key_pem(signing.public_key()))
        store = open_store(f"sqlite:///{tmp.store_path}")
        store.set_meta("federation", federation)
        set_lifetime_days(store, cert_days)
        store.close()
        for sub in ("artifacts", "uploads"):
            (staging / sub).mkdir()
        # federation.json last: its presence is what marks a complete state directory.
        info = {"federation": federation, "created_at": time.time(), "schema": SCHEMA_VERSION}
        write_public(tmp.federation_file, json.dumps(info, indent=2).encode() + b"\n")
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == "federation.json"):
            entry.rename(root / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return state


def load_authority(state: StateDir) -> CertificateAuthority:
    return load_ca(state.federation(), load_private_key(state.ca_key), state.ca_cert.read_bytes())


def signing_certificate(state: StateDir) -> Path:
    """``STATE/signing/signing.pem``: the CA's certificate for the coordinator's signing key
    (SAN ``spiffe://<federation>/coordinator``), issued the first time it is needed."""
    if not state.signing_cert.exists():
        key = load_private_key(state.signing_key)
        cert = load_authority(state).issue_signing_certificate(key.public_key())
        write_public(state.signing_cert, cert.public_bytes(serialization.Encoding.PEM))
    return state.signing_cert
