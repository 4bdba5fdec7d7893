"""provenance.sigstore.json: DSSE checked by securesystemslib, and our expectations checks."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey

from protocol.canonical import canonical_json
from protocol.dsse import public_key_id
from protocol.errors import InvalidArgument, VerificationFailed
from protocol.provenance import (
    BUILD_TYPE,
    PAYLOAD_TYPE,
    SLSA_PREDICATE_TYPE,
    ExpertProvenance,
    ProvenanceExpectations,
    TrainingRun,
    provenance_statement,
    sign_expert,
    sign_provenance,
    verify_expert,
    verify_provenance,
)
from protocol.signing import PROVENANCE_FILE

from .conftest import Pki, Site


def _sign_expert(directory: Path, run: TrainingRun, site: Site) -> ExpertProvenance:
    return sign_expert(
        directory,
        run,
        private_key_path=site.key_path,
        certificate_path=site.certificate_path,
        ca_path=site.ca_path,
    )


def test_securesystemslib_verifies_the_envelope(
    expert_dir: Path, pki: Pki, run: TrainingRun
) -> None:
    provenance = _sign_expert(expert_dir, run, pki.site_a)
    document = json.loads((expert_dir / PROVENANCE_FILE).read_text())
    envelope = Envelope.from_dict(document)
    keyid = public_key_id(pki.site_a.key.public_key())
    assert [s.keyid for s in envelope.signatures.values()] == [keyid]
    assert keyid  # DSSE keyid is not empty
    key = SSlibKey.from_crypto(pki.site_a.key.public_key(), keyid=keyid)
    assert list(envelope.verify([key], 1)) == [keyid]

    other = SSlibKey.from_crypto(pki.site_b.key.public_key(), keyid=keyid)
    with pytest.raises(Exception, match="threshold"):
        envelope.verify([other], 1)

    statement = json.loads(envelope.payload)
    assert envelope.payload_type == PAYLOAD_TYPE
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["subject"][0]["digest"] == {"sha256": provenance.model_root_digest}
    assert statement["predicateType"] == SLSA_PREDICATE_TYPE
    build = statement["predicate"]["buildDefinition"]
    assert build["buildType"] == BUILD_TYPE
    assert build["externalParameters"] == {
        "expertIndex": 2,
        "assignmentDigest": {"sha256": "a" * 64},
        "recipeDigest": {"sha256": "b" * 64},
    }
    assert {d["name"] for d in build["resolvedDependencies"]} == {
        "base-model",
        "shard-manifest",
        "atoll",
    }
    details = statement["predicate"]["runDetails"]
    assert details["builder"]["id"] == "spiffe://test/site/a"
    assert set(details["metadata"]) == {"invocationId", "startedOn", "finishedOn"}
    assert details["byproducts"][0]["annotations"]["finalLoss"] == 1.875


def test_verify_expert_round_trips_and_checks_expectations(
    expert_dir: Path, pki: Pki, run: TrainingRun
) -> None:
    written = _sign_expert(expert_dir, run, pki.site_a)
    expected = ProvenanceExpectations(
        builder_id="spiffe://test/site/a",
        expert_index=2,
        assignment_digest="a" * 64,
        recipe_digest="b" * 64,
        base_model_digest="c" * 64,
        shard_manifest_digest="d" * 64,
    )
    verified = verify_expert(
        expert_dir,
        trusted_ca_pem=pki.ca_pem,
        expected_certificate=pki.site_a.certificate,
        expected=expected,
    )
    assert verified.provenance == written
    assert verified.provenance.run == run
    assert verified.model.digests.root_sha256 == written.model_root_digest


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("expert_index", 3, "expert index check"),
        ("assignment_digest", "e" * 64, "assignment digest check"),
        ("recipe_digest", "e" * 64, "recipe digest check"),
        ("base_model_digest", "e" * 64, "base model digest check"),
        ("shard_manifest_digest", "e" * 64, "shard manifest digest check"),
    ],
)
def test_provenance_that_does_not_match_the_assignment(
    expert_dir: Path, pki: Pki, run: TrainingRun, field: str, value: Any, check: str
) -> None:
    # Validly signed by site a, but claiming values the coordinator did not issue.
    _sign_expert(expert_dir, dataclasses.replace(run, **{field: value}), pki.site_a)
    expected = ProvenanceExpectations(**{field: getattr(run, field)})
    with pytest.raises(VerificationFailed) as caught:
        verify_expert(expert_dir, trusted_ca_pem=pki.ca_pem, expected=expected)
    message = str(caught.value)
    assert check in message
    assert f"expected {getattr(run, field)}, provenance claims {value}" in message


def test_provenance_signed_by_another_key(expert_dir: Path, pki: Pki, run: TrainingRun) -> None:
    provenance = _sign_expert(expert_dir, run, pki.site_a)
    forged = sign_provenance(provenance, pki.site_b.key)
    (expert_dir / PROVENANCE_FILE).write_text(json.dumps(forged))
    with pytest.raises(VerificationFailed, match="no signature with keyid"):
        verify_expert(expert_dir, trusted_ca_pem=pki.ca_pem)

    # Same keyid, wrong signature bytes.
    forged["signatures"][0]["keyid"] = public_key_id(pki.site_a.key.public_key())
    (expert_dir / PROVENANCE_FILE).write_text(json.dumps(forged))
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_expert(expert_dir, trusted_ca_pem=pki.ca_pem)


def test_provenance_for_another_model_or_builder(
    expert_dir: Path, pki: Pki, run: TrainingRun
) -> None:
    provenance = _sign_expert(expert_dir, run, pki.site_a)
    other_model = dataclasses.replace(provenance, model_root_digest="f" * 64)
    (expert_dir / PROVENANCE_FILE).write_text(
        json.dumps(sign_provenance(other_model, pki.site_a.key))
    )
    with pytest.raises(VerificationFailed, match="model root digest check"):
        verify_expert(expert_dir, trusted_ca_pem=pki.ca_pem)

    other_builder = dataclasses.replace(provenance, builder_id="spiffe://test/site/b")
    (expert_dir / PROVENANCE_FILE).write_text(
        json.dumps(sign_provenance(other_builder, pki.site_a.key))
    )
    with pytest.raises(VerificationFailed, match="builder id check"):
        verify_expert(expert_dir, trusted_ca_pem=pki.ca_pem)


def test_tampered_payload_and_garbage(pki: Pki, run: TrainingRun) -> None:
    provenance = ExpertProvenance("0" * 64, "spiffe://test/site/a", run)
    envelope = sign_provenance(provenance, pki.site_a.key)
    statement = provenance_statement(provenance)
    statement["predicate"]["buildDefinition"]["externalParameters"]["expertIndex"] = 7
    envelope["payload"] = base64.b64encode(canonical_json(statement)).decode()
    public_key = pki.site_a.key.public_key()
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_provenance(json.dumps(envelope).encode(), public_key)
    with pytest.raises(VerificationFailed, match="not a DSSE envelope"):
        verify_provenance(b"[]", public_key)
    envelope["payloadType"] = "text/plain"
    with pytest.raises(VerificationFailed, match="payloadType"):
        verify_provenance(json.dumps(envelope).encode(), public_key)


def test_training_run_is_validated(run: TrainingRun) -> None:
    with pytest.raises(InvalidArgument, match="recipe_digest"):
        dataclasses.replace(run, recipe_digest="xyz")
    with pytest.raises(InvalidArgument, match="final_loss"):
        dataclasses.replace(run, final_loss=float("nan"))
    with pytest.raises(InvalidArgument, match="before started_on"):
        dataclasses.replace(run, finished_on=run.started_on.replace(year=2000))
    with pytest.raises(InvalidArgument, match="processes: expected an integer >= 1, got 0"):
        dataclasses.replace(run, processes=0)


def test_processes_and_nodes_are_signed_and_read_back(pki: Pki, run: TrainingRun) -> None:
    scaled = dataclasses.replace(run, processes=16, nodes=2)
    provenance = ExpertProvenance("e" * 64, "spiffe://fed/site/a", scaled)
    statement = provenance_statement(provenance)
    [summary] = statement["predicate"]["runDetails"]["byproducts"]
    assert summary["annotations"]["processes"] == 16 and summary["annotations"]["nodes"] == 2
    envelope = sign_provenance(provenance, pki.site_a.key)
    read = verify_provenance(json.dumps(envelope).encode(), pki.site_a.key.public_key())
    assert (read.run.processes, read.run.nodes) == (16, 2)
    # A run that did not record them (statements signed before) has neither key.
    [old] = provenance_statement(ExpertProvenance("e" * 64, "spiffe://fed/site/a", run))[
        "predicate"
    ]["runDetails"]["byproducts"]
    assert "processes" not in old["annotations"] and "nodes" not in old["annotations"]
