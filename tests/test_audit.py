"""Issue 5 integrated: signed experts accepted over real gRPC + mTLS with a receipt, every bad
input rejected precisely (and recorded), revocation, the audit log's export and verification,
and the `coordinator audit` / `coordinator revoke` / `atoll verify` command lines.

Sites sign with the key and certificate they enrolled with (their workdir), and their
provenance carries the digests the coordinator issued in the assignment.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.numpy import save_file

from coordinator import acceptance
from coordinator.cli import main as coordinator_main
from coordinator.federation import init_federation
from ensemble.cli import main as atoll_main
from protocol.audit_export import verify_log_file
from protocol.audit_log import Receipt, verify_receipt
from protocol.client import FederationClient
from protocol.errors import PermissionDenied, VerificationFailed
from protocol.exit_codes import ExitCode
from protocol.messages import AssignmentReply, CommitResult
from protocol.provenance import TrainingRun, sign_expert
from site_agent.transfer import directory_manifest, upload_directory
from site_agent.workdir import Workdir

SHARDS = {"expert-0.json": b'{"samples": ["a", "b"]}', "expert-1.json": b'{"samples": ["c"]}'}


@dataclass
class Site:
    workdir: Workdir
    client: FederationClient
    assignment: AssignmentReply


@dataclass
class Federation:
    running: Any
    alpha: Site  # holds expert 0
    beta: Site  # holds expert 1

    def coordinator_key(self) -> ec.EllipticCurvePublicKey:
        key = serialization.load_pem_public_key(self.running.state.signing_pub.read_bytes())
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key


@pytest.fixture
def fed(running: Any, tmp_path: Path) -> Any:
    running.add_plan(2, SHARDS)
    sites = []
    for name in ("alpha", "beta"):
        workdir = running.enrol(tmp_path, name)
        client = running.client(workdir)
        sites.append(Site(workdir, client, client.get_assignment()))
    assert [s.assignment.expert_index for s in sites] == [0, 1]
    yield Federation(running, *sites)
    for site in sites:
        site.client.close()


def training_run(assignment: AssignmentReply, **changes: Any) -> TrainingRun:
    """The run a site records: every digest from the assignment the coordinator issued."""
    document = json.loads(assignment.assignment_json)
    shard = SHARDS[f"expert-{assignment.expert_index}.json"]
    finished = datetime.now(UTC)
    run = TrainingRun(
        expert_index=assignment.expert_index,
        assignment_digest=assignment.assignment_digest,
        recipe_digest=document["recipe"]["sha256"],
        base_model_digest=document["base_model"]["digest"],
        shard_manifest_digest=hashlib.sha256(shard).hexdigest(),
        atoll_version="0.1.0",
        invocation_id=str(uuid.uuid4()),
        started_on=finished - timedelta(minutes=5),
        finished_on=finished,
        steps=10,
        final_loss=2.5,
    )
    return replace(run, **changes)


def expert_dir(root: Path, seed: int = 0) -> Path:
    """A tiny save_pretrained-like directory (training is not what is tested here)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file(
        {"w": rng.standard_normal((16, 8), dtype=np.float32)}, str(root / "model.safetensors")
    )
    (root / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}\n')
    return root


def signed_expert(
    root: Path, site: Site, run: TrainingRun | None = None, signer: Site | None = None
) -> Path:
    directory = expert_dir(root)
    signer = signer or site
    sign_expert(
        directory,
        run or training_run(site.assignment),
        private_key_path=signer.workdir.key,
        certificate_path=signer.workdir.cert,
        ca_path=signer.workdir.ca,
    )
    return directory


def upload(site: Site, directory: Path) -> CommitResult:
    return upload_directory(site.client, site.assignment.expert_index, directory)


def accepted_uploads(fed: Federation) -> list[Any]:
    """Every accepted upload, found by reading the database directly (not via the log)."""
    with sqlite3.connect(fed.running.state.store_path) as conn:
        ids = [r[0] for r in conn.execute("SELECT upload_id FROM uploads WHERE state = 'accepted'")]
    return [fed.running.coordinator.store.get_upload(i) for i in sorted(ids)]


def kinds(fed: Federation) -> list[str]:
    return [r.event().kind for r in fed.running.coordinator.store.audit_events()]


# -- acceptance ----------------------------------------------------------------------------


def test_signed_expert_is_accepted_with_a_verifiable_receipt(
    fed: Federation, tmp_path: Path
) -> None:
    result = upload(fed.alpha, signed_expert(tmp_path / "expert-0", fed.alpha))
    assert result.accepted, result.reason
    receipt = Receipt.from_json(json.loads(result.receipt_json))
    verify_receipt(receipt, fed.coordinator_key())
    assert receipt.event.kind == "accepted"
    details = receipt.event.details
    assert details["site"] == "alpha" and details["expert"] == 0
    provenance = details["provenance"]
    assert provenance["builder_id"] == "spiffe://testfed/site/alpha"
    assert provenance["assignment_digest"] == fed.alpha.assignment.assignment_digest
    assert (
        provenance["shard_manifest_digest"] == hashlib.sha256(SHARDS["expert-0.json"]).hexdigest()
    )
    # The receipt's checkpoint is kept, and a repeated commit answers the same receipt.
    store = fed.running.coordinator.store
    assert receipt.checkpoint in store.list_checkpoints()
    (accepted,) = accepted_uploads(fed)
    assert fed.alpha.client.commit_upload(accepted.upload_id).receipt_json == result.receipt_json
    assert kinds(fed) == [
        "invited",  # the fixture's recipe and plan are written straight into the store
        "enrolled",
        "assigned",
        "invited",
        "enrolled",
        "assigned",
        "upload_begun",
        "accepted",
    ]
    # A repeated GetAssignment is not a new assignment.
    fed.alpha.client.get_assignment()
    assert kinds(fed).count("assigned") == 2


def _flip_byte(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


Bad = Callable[[Federation, Path], Path]


def _flipped(fed: Federation, root: Path) -> Path:
    directory = signed_expert(root, fed.alpha)
    _flip_byte(directory)
    return directory


def _missing(fed: Federation, root: Path) -> Path:
    directory = signed_expert(root, fed.alpha)
    (directory / "config.json").unlink()
    return directory


def _extra(fed: Federation, root: Path) -> Path:
    directory = signed_expert(root, fed.alpha)
    (directory / "notes.txt").write_text("not signed\n")
    return directory


def _other_sites_key(fed: Federation, root: Path) -> Path:
    return signed_expert(root, fed.alpha, signer=fed.beta)


def _other_expert(fed: Federation, root: Path) -> Path:
    return signed_expert(root, fed.alpha, training_run(fed.alpha.assignment, expert_index=1))


def _digest(field: str) -> Bad:
    def bad(fed: Federation, root: Path) -> Path:
        run = training_run(fed.alpha.assignment, **{field: "e" * 64})
        return signed_expert(root, fed.alpha, run)

    return bad


BAD_INPUTS: dict[str, tuple[Bad, str]] = {
    "flipped-byte": (_flipped, "model.sig: file check: expected sha256 .* for model.safetensors"),
    "missing-file": (_missing, "model.sig: file check: missing file config.json"),
    "extra-file": (_extra, r"model.sig: file check: extra file notes.txt \(not in model.sig\)"),
    "another-sites-key": (_other_sites_key, "model.sig: signer check: signed by certificate"),
    "claims-another-expert": (
        _other_expert,
        "provenance.sigstore.json: expert index check: expected 0, provenance claims 1",
    ),
    "assignment-digest": (
        _digest("assignment_digest"),
        "provenance.sigstore.json: assignment digest check: expected [0-9a-f]{64}, "
        "provenance claims e{64}",
    ),
    "base-model-digest": (
        _digest("base_model_digest"),
        "provenance.sigstore.json: base model digest check",
    ),
    "recipe-digest": (_digest("recipe_digest"), "provenance.sigstore.json: recipe digest check"),
    "shard-manifest-digest": (
        _digest("shard_manifest_digest"),
        "provenance.sigstore.json: shard manifest digest check",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_expert_is_rejected_precisely_and_changes_nothing_accepted(
    fed: Federation, tmp_path: Path, case: str
) -> None:
    good = upload(fed.alpha, signed_expert(tmp_path / "good", fed.alpha))
    assert good.accepted, good.reason
    before = accepted_uploads(fed)

    make, reason = BAD_INPUTS[case]
    result = upload(fed.alpha, make(fed, tmp_path / "bad"))

    assert not result.accepted
    assert re.search(reason, result.reason), result.reason
    store = fed.running.coordinator.store
    rejected = [r.event() for r in store.audit_events() if r.event().kind == "rejected"]
    assert [e.details["reason"] for e in rejected] == [result.reason]
    upload_id = rejected[0].details["upload_id"]
    record = store.get_upload(upload_id)
    assert record.state == "rejected" and record.reason == result.reason
    assert accepted_uploads(fed) == before
    assert fed.alpha.client.commit_upload(upload_id).reason == result.reason  # final


def test_revoked_site_is_refused_and_its_experts_flagged(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(fed.running.state.root)
    assert upload(fed.alpha, signed_expert(tmp_path / "first", fed.alpha)).accepted
    # Signed and begun before the revocation, committed after.
    second = signed_expert(tmp_path / "second", fed.alpha, training_run(fed.alpha.assignment))
    status = fed.alpha.client.begin_upload(0, directory_manifest(second))

    assert coordinator_main(["revoke", "--state", state, "alpha", "--json"]) == 0
    revoked = json.loads(capsys.readouterr().out)
    assert revoked["site"] == "alpha"
    assert [row["expert"] for row in revoked["flagged_experts"]] == [0]

    with pytest.raises(PermissionDenied, match="site 'alpha' is revoked"):
        fed.alpha.client.commit_upload(status.upload_id)
    with pytest.raises(PermissionDenied, match="revoked"):
        fed.alpha.client.get_assignment()
    # The acceptance check refuses it on its own too (defence in depth).
    store = fed.running.coordinator.store
    record = store.get_upload(status.upload_id)
    reason = acceptance.check_expert(
        store, "testfed", fed.running.state.ca_cert.read_bytes(), record, second
    )
    assert reason is not None and reason.startswith("revocation check: site 'alpha' was revoked")
    assert len(accepted_uploads(fed)) == 1
    assert kinds(fed)[-1] == "revoked"

    assert coordinator_main(["audit", "--state", state, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["provenance"]
    assert row["site"] == "alpha" and row["site_revoked"] is True
    assert report["log"]["verified"] is True
    # Revoking again changes nothing and records nothing.
    size = store.audit_size()
    assert coordinator_main(["revoke", "--state", state, "alpha"]) == 0
    assert store.audit_size() == size + 0 and kinds(fed).count("revoked") == 1


# -- the audit log, its export, and the command lines --------------------------------------


def test_audit_cli_export_verifies_and_tampering_is_caught(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(fed.running.state.root)
    result = upload(fed.alpha, signed_expert(tmp_path / "e0", fed.alpha))
    assert result.accepted
    receipt = Receipt.from_json(json.loads(result.receipt_json))
    assert upload(fed.beta, signed_expert(tmp_path / "e1", fed.beta)).accepted

    export = tmp_path / "audit.jsonl"
    assert coordinator_main(["audit", "--state", state, "--json", "--export", str(export)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["expert"], r["site"]) for r in report["provenance"]] == [(0, "alpha"), (1, "beta")]
    row = report["provenance"][0]
    assert row["data_digest"] == hashlib.sha256(SHARDS["expert-0.json"]).hexdigest()
    assert (
        row["base_model_digest"]
        == json.loads(fed.alpha.assignment.assignment_json)["base_model"]["digest"]
    )
    assert row["log_index"] == receipt.index
    log = report["log"]
    assert log["verified"] and log["unsigned_events"] == 0 and log["checkpoints"] == 2

    key = fed.coordinator_key()
    verified = verify_log_file(export, key, trusted=[receipt.checkpoint])
    assert verified.tree_size == log["size"] and verified.root_hash == log["root_hash"]

    # The auditor's offline check, with the receipt a site kept.
    receipt_file = tmp_path / "receipt.json"
    receipt_file.write_text(result.receipt_json)
    pub = str(fed.running.state.signing_pub)
    atoll_audit = ["audit", str(export), "--key", pub, "--receipt", str(receipt_file), "--json"]
    assert atoll_main(atoll_audit) == 0
    offline = json.loads(capsys.readouterr().out)
    assert offline["verified"] and offline["root_hash"] == log["root_hash"]

    lines = export.read_bytes().splitlines(keepends=True)
    events = [i for i, line in enumerate(lines) if json.loads(line)["type"] == "event"]
    # Truncated: the tail cut off, checked against the checkpoint of a receipt held.
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_bytes(b"".join(lines[: events[receipt.index]]))
    with pytest.raises(VerificationFailed, match="truncated"):
        verify_log_file(truncated, key, trusted=[receipt.checkpoint])
    atoll_audit[1] = str(truncated)
    assert atoll_main(atoll_audit) == ExitCode.VERIFY_FAILED
    assert "truncated" in json.loads(capsys.readouterr().out)["error"]
    # Reordered: two events swapped, as lines or with their indexes rewritten.
    first, second = events[0], events[1]
    swapped = list(lines)
    swapped[first], swapped[second] = lines[second], lines[first]
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_bytes(b"".join(swapped))
    with pytest.raises(VerificationFailed, match="missing or reordered"):
        verify_log_file(reordered, key)
    renumbered = list(swapped)
    for position, number in ((first, 0), (second, 1)):
        record = json.loads(swapped[position])
        renumbered[position] = (json.dumps({**record, "index": number}) + "\n").encode()
    reordered.write_bytes(b"".join(renumbered))
    with pytest.raises(VerificationFailed, match="altered, removed or reordered"):
        verify_log_file(reordered, key)

    # Tampering with the store itself is caught by `coordinator audit`.
    conn = sqlite3.connect(fed.running.state.store_path)
    conn.execute("DROP TRIGGER audit_events_no_update")
    conn.execute("UPDATE audit_events SET canonical = ? WHERE idx = 0", (b'{"x":1}',))
    conn.commit()
    conn.close()
    assert coordinator_main(["audit", "--state", state]) == ExitCode.VERIFY_FAILED
    assert "VERIFICATION FAILED: audit event 0" in capsys.readouterr().out


def test_atoll_verify(fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = signed_expert(tmp_path / "expert-0", fed.alpha)
    ca = str(fed.alpha.workdir.ca)
    assert atoll_main(["verify", str(directory), "--trust", ca, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] and report["kind"] == "expert"
    assert report["signer"]["spiffe_id"] == "spiffe://testfed/site/alpha"
    assert report["provenance"]["expert_index"] == 0
    assert atoll_main(["verify", str(directory), "--trust", ca]) == 0
    assert "signed by       spiffe://testfed/site/alpha" in capsys.readouterr().out

    _flip_byte(directory)
    code = atoll_main(["verify", str(directory), "--trust", ca, "--json"])
    assert code == ExitCode.VERIFY_FAILED
    captured = capsys.readouterr()
    failure = json.loads(captured.out)
    assert failure["verified"] is False and "file check" in failure["error"]
    assert "error: model.sig: file check" in captured.err
    assert atoll_main(["verify", str(tmp_path), "--trust", ca]) == ExitCode.NOT_FOUND
    assert atoll_main(["verify", str(tmp_path / "nope"), "--trust", ca]) == ExitCode.NOT_FOUND
    # Another federation's CA is not a trust anchor for this one's sites.
    other = init_federation(tmp_path / "other", "otherfed")
    good = signed_expert(tmp_path / "again", fed.alpha)
    code = atoll_main(["verify", str(good), "--trust", str(other.ca_cert)])
    assert code == ExitCode.VERIFY_FAILED
    assert "certificate chain check" in capsys.readouterr().err
