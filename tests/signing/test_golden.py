"""Golden files: signed experts and audit logs written by atoll 0.1.0 must keep verifying."""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.audit_export import export_lines, verify_log_file
from protocol.audit_log import Checkpoint, Receipt, verify_consistency_proof, verify_receipt
from protocol.canonical import canonical_json
from protocol.provenance import ProvenanceExpectations, provenance_statement, verify_expert
from protocol.signing import PROVENANCE_FILE, SIGNATURE_FILE

GOLDEN = Path(__file__).parent / "golden"
ROOT = "d2fca01852098d40d7a09913b129fe640aaeab3c3f34b9895535ec9b30ff28ac"


def _coordinator_key() -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key((GOLDEN / "coordinator.pub.pem").read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_golden_expert_verifies_and_its_statement_is_reproduced() -> None:
    verified = verify_expert(
        GOLDEN / "expert-1",
        trusted_ca_pem=(GOLDEN / "ca.pem").read_bytes(),
        expected=ProvenanceExpectations(
            builder_id="spiffe://golden/site/a",
            expert_index=1,
            assignment_digest="1" * 64,
            recipe_digest="2" * 64,
            base_model_digest="3" * 64,
            shard_manifest_digest="4" * 64,
        ),
    )
    assert verified.model.digests.root_sha256 == ROOT
    assert sorted(verified.model.digests.files) == ["config.json", "model.safetensors"]
    run = verified.provenance.run
    assert run.started_on == datetime.datetime(2026, 1, 15, 13, 0, tzinfo=datetime.UTC)
    assert (run.steps, run.final_loss, run.gpus) == (100, 2.5, ("NVIDIA H100 80GB HBM3",))
    # Today's code writes byte for byte the statement the golden envelope signed.
    envelope = json.loads((GOLDEN / "expert-1" / PROVENANCE_FILE).read_text())
    assert base64.b64decode(envelope["payload"]) == canonical_json(
        provenance_statement(verified.provenance)
    )


def test_golden_expert_passes_the_model_signing_cli(model_signing_cli: str) -> None:
    expert = GOLDEN / "expert-1"
    result = subprocess.run(
        [model_signing_cli, "verify", "certificate", str(expert),
         "--signature", str(expert / SIGNATURE_FILE),
         "--certificate_chain", str(GOLDEN / "ca.pem")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_golden_audit_log_receipt_and_consistency() -> None:
    key = _coordinator_key()
    result = verify_log_file(GOLDEN / "audit.jsonl", key, log_id="spiffe://golden/coordinator")
    assert [e.kind for e in result.events] == [
        "enrolled",
        "assigned",
        "upload_begun",
        "rejected",
        "accepted",
    ]
    old, new = result.checkpoints
    # Today's exporter writes the same bytes.
    exported = b"".join(export_lines(result.events, result.checkpoints))
    assert exported == (GOLDEN / "audit.jsonl").read_bytes()

    receipt = Receipt.from_json(json.loads((GOLDEN / "receipt.json").read_text()))
    verify_receipt(receipt, key)
    assert receipt.event.details["model_root_digest"] == ROOT
    assert receipt.checkpoint == Checkpoint.from_json(new.to_json())

    proof = json.loads((GOLDEN / "consistency-2-5.json").read_text())
    verify_consistency_proof(old, new, proof, key)
