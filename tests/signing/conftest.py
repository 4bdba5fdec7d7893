"""Fixtures: a federation CA and site certificates made here with ``cryptography``.

Deliberately independent of ``coordinator.ca``: these tests pin the file formats, not the
enrolment code.
"""

from __future__ import annotations

import datetime
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from safetensors.numpy import save_file

from protocol.provenance import TrainingRun

_NOW = datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Site:
    """A site's key and certificate, as files and objects."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    key_path: Path
    certificate_path: Path
    public_key_path: Path
    ca_path: Path  # the CA that issued it (PEM)


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    ca_path: Path
    site_a: Site
    site_b: Site  # same CA, another site
    rogue_a: Site  # claims spiffe://test/site/a, issued by another CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(hours=1))
        .not_valid_after(_NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _make_site(
    directory: Path,
    name: str,
    spiffe_id: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
) -> Site:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(minutes=30))
        .not_valid_after(_NOW + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certificate_path = directory / f"{name}.pem"
    certificate_path.write_bytes(_pem(certificate))
    public_key_path = directory / f"{name}.pub"
    public_key_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    ca_path = directory / "issuer-ca.pem"
    ca_path.write_bytes(_pem(ca))
    return Site(key, certificate, key_path, certificate_path, public_key_path, ca_path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, ca = _make_ca("test federation CA")
    rogue_key, rogue = _make_ca("another CA")
    (root / "ca.pem").write_bytes(_pem(ca))
    return Pki(
        ca_pem=_pem(ca),
        ca_path=root / "ca.pem",
        site_a=_make_site(root / "a", "site-a", "spiffe://test/site/a", ca_key, ca),
        site_b=_make_site(root / "b", "site-b", "spiffe://test/site/b", ca_key, ca),
        rogue_a=_make_site(root / "rogue", "site-a", "spiffe://test/site/a", rogue_key, rogue),
    )


@pytest.fixture(scope="session")
def _expert_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small save_pretrained-like directory: config, two safetensors shards, an index."""
    directory = tmp_path_factory.mktemp("expert-template") / "expert-2"
    directory.mkdir()
    rng = np.random.default_rng(0)
    save_file(
        {"w": rng.standard_normal((64, 32), dtype=np.float32)},
        str(directory / "model-00001-of-00002.safetensors"),
    )
    save_file(
        {"b": rng.standard_normal((128,), dtype=np.float32)},
        str(directory / "model-00002-of-00002.safetensors"),
    )
    (directory / "config.json").write_text('{"model_type": "llama", "hidden_size": 32}\n')
    (directory / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "model-00001-of-00002.safetensors", '
        '"b": "model-00002-of-00002.safetensors"}}\n'
    )
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return directory


@pytest.fixture
def expert_dir(_expert_template: Path, tmp_path: Path) -> Path:
    """A fresh, unsigned copy of the expert directory."""
    target = tmp_path / _expert_template.name
    shutil.copytree(_expert_template, target)
    return target


@pytest.fixture
def run() -> TrainingRun:
    return TrainingRun(
        expert_index=2,
        assignment_digest="a" * 64,
        recipe_digest="b" * 64,
        base_model_digest="c" * 64,
        shard_manifest_digest="d" * 64,
        atoll_version="0.1.0",
        invocation_id="2f1c6c0e-8a7e-4a55-9d0a-3f3b1e2c4d5e",
        started_on=_NOW - datetime.timedelta(hours=3),
        finished_on=_NOW,
        steps=1200,
        final_loss=1.875,
        gpus=("NVIDIA H100 80GB HBM3",) * 2,
    )


@pytest.fixture(scope="session")
def model_signing_cli() -> str:
    """The model_signing console script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "model_signing"
    return str(candidate) if candidate.exists() else "model_signing"
