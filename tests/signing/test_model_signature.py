"""model.sig: our signer against the standard `model_signing` CLI, and our verifier's checks."""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
from pathlib import Path

import pytest

from protocol.dsse import dsse_pae, ecdsa_sign
from protocol.errors import InvalidArgument, VerificationFailed
from protocol.signing import (
    PROVENANCE_FILE,
    SIGNATURE_FILE,
    ModelDigests,
    hash_model_files,
    public_key_bundle,
    read_signed_digests,
    root_digest,
    sign_model,
    verify_model,
)

from .conftest import Pki, Site

SHARD = "model-00001-of-00002.safetensors"


def _sign(directory: Path, site: Site, known: dict[str, str] | None = None) -> ModelDigests:
    return sign_model(
        directory,
        private_key_path=site.key_path,
        certificate_path=site.certificate_path,
        ca_path=site.ca_path,
        known=known,
    )


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _cli(cli: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cli, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def _verify_certificate(
    cli: str, directory: Path, ca_path: Path
) -> subprocess.CompletedProcess[str]:
    return _cli(
        cli, "verify", "certificate", directory, "--signature", directory / SIGNATURE_FILE,
        "--certificate_chain", ca_path,
    )  # fmt: skip


def test_sign_then_verify_returns_signer_and_digests(expert_dir: Path, pki: Pki) -> None:
    signed = sign_model(
        expert_dir,
        private_key_path=pki.site_a.key_path,
        certificate_path=pki.site_a.certificate_path,
        ca_path=pki.ca_path,
    )
    verified = verify_model(
        expert_dir, trusted_ca_pem=pki.ca_pem, expected_certificate=pki.site_a.certificate
    )
    assert verified.signer_spiffe_id == "spiffe://test/site/a"
    assert verified.digests == signed
    assert set(signed.files) == {
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer/tokenizer.json",
    }
    assert signed.root_sha256 == root_digest(hash_model_files(expert_dir))


def test_model_signing_cli_accepts_certificate_and_key(
    expert_dir: Path, pki: Pki, model_signing_cli: str, tmp_path: Path
) -> None:
    _sign(expert_dir, pki.site_a)
    (expert_dir / PROVENANCE_FILE).write_text("{}")  # written after model.sig, never signed

    result = _verify_certificate(model_signing_cli, expert_dir, pki.ca_path)
    assert result.returncode == 0, result.stderr
    assert "Verification succeeded" in result.stdout

    key_bundle = tmp_path / "model.key.sig"
    key_bundle.write_bytes(public_key_bundle((expert_dir / SIGNATURE_FILE).read_bytes()))
    result = _cli(
        model_signing_cli, "verify", "key", expert_dir, "--signature", key_bundle,
        "--public_key", pki.site_a.public_key_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Another site's public key is refused.
    result = _cli(
        model_signing_cli, "verify", "key", expert_dir, "--signature", key_bundle,
        "--public_key", pki.site_b.public_key_path,
    )  # fmt: skip
    assert result.returncode != 0


def test_model_signing_cli_rejects_flipped_byte_and_foreign_ca(
    expert_dir: Path, pki: Pki, model_signing_cli: str
) -> None:
    _sign(expert_dir, pki.rogue_a)
    result = _verify_certificate(model_signing_cli, expert_dir, pki.ca_path)
    assert result.returncode != 0

    _sign(expert_dir, pki.site_a)
    _flip_last_byte(expert_dir / SHARD)
    result = _verify_certificate(model_signing_cli, expert_dir, pki.ca_path)
    assert result.returncode != 0
    assert SHARD in result.stderr


def test_root_digest_sorts_paths_like_model_signing(tmp_path: Path, pki: Pki) -> None:
    # "a-b/c" < "a/b" as strings, but ("a", "b") < ("a-b", "c") as path components.
    for name in ("a/b", "a-b/c", "a.txt", "b"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    signed = sign_model(
        tmp_path,
        private_key_path=pki.site_a.key_path,
        certificate_path=pki.site_a.certificate_path,
        ca_path=pki.ca_path,
    )
    assert signed.root_sha256 == root_digest(hash_model_files(tmp_path))


def test_flipped_byte_names_file_and_both_digests(expert_dir: Path, pki: Pki) -> None:
    _sign(expert_dir, pki.site_a)
    signed = read_signed_digests((expert_dir / SIGNATURE_FILE).read_bytes()).files[SHARD]
    _flip_last_byte(expert_dir / SHARD)
    actual = hash_model_files(expert_dir)[SHARD]
    with pytest.raises(VerificationFailed) as caught:
        verify_model(expert_dir, trusted_ca_pem=pki.ca_pem)
    message = str(caught.value)
    assert f"expected sha256 {signed[:16]}.. for {SHARD}, got {actual[:16]}.." in message
    assert "file check" in message


def test_missing_and_extra_files_are_named(expert_dir: Path, pki: Pki) -> None:
    _sign(expert_dir, pki.site_a)
    (expert_dir / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(VerificationFailed, match=r"missing file tokenizer/tokenizer\.json"):
        verify_model(expert_dir, trusted_ca_pem=pki.ca_pem)

    _sign(expert_dir, pki.site_a)
    (expert_dir / "backdoor.py").write_text("print('hi')\n")
    with pytest.raises(VerificationFailed, match=r"extra file backdoor\.py"):
        verify_model(expert_dir, trusted_ca_pem=pki.ca_pem)


def test_signature_from_another_key_is_refused(expert_dir: Path, pki: Pki) -> None:
    # A model.sig carrying site a's certificate but signed with site b's key.
    _sign(expert_dir, pki.site_a)
    path = expert_dir / SIGNATURE_FILE
    bundle = json.loads(path.read_bytes())
    envelope = bundle["dsseEnvelope"]
    payload = base64.b64decode(envelope["payload"])
    forged = ecdsa_sign(pki.site_b.key, dsse_pae(envelope["payloadType"], payload))
    envelope["signatures"][0]["sig"] = base64.b64encode(forged).decode()
    path.write_text(json.dumps(bundle))
    with pytest.raises(VerificationFailed, match="signature check"):
        verify_model(expert_dir, trusted_ca_pem=pki.ca_pem)


def test_signer_must_be_the_expected_site(expert_dir: Path, pki: Pki) -> None:
    _sign(expert_dir, pki.site_b)
    with pytest.raises(VerificationFailed, match="signer check"):
        verify_model(
            expert_dir, trusted_ca_pem=pki.ca_pem, expected_certificate=pki.site_a.certificate
        )
    with pytest.raises(VerificationFailed, match=r"expected spiffe://test/site/a, got .*/site/b"):
        verify_model(
            expert_dir, trusted_ca_pem=pki.ca_pem, expected_spiffe_id="spiffe://test/site/a"
        )


def test_certificate_from_another_ca_is_refused(expert_dir: Path, pki: Pki) -> None:
    _sign(expert_dir, pki.rogue_a)  # same SPIFFE id as site a, foreign CA
    with pytest.raises(VerificationFailed, match="does not chain to the trusted CA"):
        verify_model(expert_dir, trusted_ca_pem=pki.ca_pem)


def test_key_must_match_certificate(expert_dir: Path, pki: Pki) -> None:
    with pytest.raises(InvalidArgument, match="does not match"):
        sign_model(
            expert_dir,
            private_key_path=pki.site_b.key_path,
            certificate_path=pki.site_a.certificate_path,
            ca_path=pki.ca_path,
        )


def test_missing_or_garbled_signature(expert_dir: Path, pki: Pki) -> None:
    with pytest.raises(VerificationFailed, match=r"no model\.sig"):
        verify_model(expert_dir, trusted_ca_pem=pki.ca_pem)
    (expert_dir / SIGNATURE_FILE).write_text('{"mediaType": "something/else"}')
    with pytest.raises(VerificationFailed, match="expected a Sigstore bundle"):
        verify_model(expert_dir, trusted_ca_pem=pki.ca_pem)


def test_signature_may_not_leave_weights_unsigned(expert_dir: Path, pki: Pki) -> None:
    from model_signing import hashing, signing

    signing.Config().use_certificate_signer(
        private_key=pki.site_a.key_path,
        signing_certificate=pki.site_a.certificate_path,
        certificate_chain=[pki.ca_path],
    ).set_hashing_config(hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE, SHARD])).sign(
        expert_dir, expert_dir / SIGNATURE_FILE
    )
    with pytest.raises(VerificationFailed, match=f"leaves {SHARD}.* unsigned"):
        verify_model(expert_dir, trusted_ca_pem=pki.ca_pem)


def test_chain_is_judged_at_signing_time_unless_told(expert_dir: Path, pki: Pki) -> None:
    _sign(expert_dir, pki.site_a)
    later = pki.site_a.certificate.not_valid_after_utc + datetime.timedelta(days=1)
    verify_model(expert_dir, trusted_ca_pem=pki.ca_pem)  # at notBefore: valid
    with pytest.raises(VerificationFailed, match="certificate has expired"):
        verify_model(expert_dir, trusted_ca_pem=pki.ca_pem, at=later)


def _statement(directory: Path) -> bytes:
    bundle = json.loads((directory / SIGNATURE_FILE).read_bytes())
    return base64.b64decode(bundle["dsseEnvelope"]["payload"])


def test_known_digests_sign_the_statement_a_full_hashing_signs_without_reading(
    expert_dir: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sign(expert_dir, pki.site_a)
    full = _statement(expert_dir)
    known = hash_model_files(expert_dir)
    opened: list[str] = []
    real_open = open

    def counting_open(file: object, *args: object, **kwargs: object) -> object:
        opened.append(Path(str(file)).name)
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", counting_open)
    signed = _sign(expert_dir, pki.site_a, known)
    monkeypatch.undo()
    # Byte for byte the statement of a full hashing; no signed file was opened to sign it.
    assert _statement(expert_dir) == full
    assert not set(opened) & {Path(name).name for name in known}
    assert verify_model(expert_dir, trusted_ca_pem=pki.ca_pem).digests == signed
