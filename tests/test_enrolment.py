"""Enrolment and mutual TLS against a real server on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from coordinator import enrolment
from coordinator.federation import init_federation, load_authority
from protocol import federation_pb2 as pb
from protocol import federation_pb2_grpc as pb_grpc
from protocol.client import FederationClient
from protocol.errors import (
    AlreadyExists,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    VerificationFailed,
)
from protocol.identity import EnrolmentToken, coordinator_dns_name
from protocol.messages import AssignmentStatus, Heartbeat
from protocol.retry import Retry
from site_agent.agent import connect, enrol
from site_agent.workdir import Workdir

FAST = Retry(initial=0.05, maximum=0.2, give_up_after=1.0)


def test_enrol_then_mutual_tls_calls(running: Any, tmp_path: Path) -> None:
    workdir = running.enrol(tmp_path, "alpha")
    identity = workdir.identity()
    assert identity.spiffe_id == "spiffe://testfed/site/alpha"
    assert (workdir.key.stat().st_mode & 0o777) == 0o600
    with running.client(workdir) as client:
        reply = client.get_assignment()
        assert reply.status is AssignmentStatus.PENDING
        assert reply.retry_after_seconds > 0 and "no partition plan yet" in reply.reason
        beat = client.heartbeat(Heartbeat(phase="waiting"))
        assert beat.next_heartbeat_seconds == 1
    assert running.coordinator.store.latest_heartbeats()["alpha"].phase == "waiting"


def test_reused_token_is_refused_and_changes_nothing(running: Any, tmp_path: Path) -> None:
    token = running.invite("alpha")
    enrol(Workdir(tmp_path / "one"), running.address, token, running.enrol_address, FAST)
    before = running.coordinator.store.get_site("alpha")
    with pytest.raises(Unauthenticated, match="already used"):
        enrol(Workdir(tmp_path / "two"), running.address, token, running.enrol_address, FAST)
    assert running.coordinator.store.get_site("alpha") == before
    assert not (tmp_path / "two" / "site.json").exists()


def test_expired_token(running: Any, tmp_path: Path) -> None:
    store, ca = running.coordinator.store, running.coordinator.ca
    token = enrolment.invite(store, ca, "alpha", ttl_seconds=5, now=time.time() - 60)
    with pytest.raises(Unauthenticated, match="expired"):
        enrol(Workdir(tmp_path / "w"), running.address, str(token), running.enrol_address, FAST)
    assert store.get_token(token.token_id).used_at is None
    assert store.list_sites() == []


def test_unknown_and_wrong_secret_tokens(running: Any, tmp_path: Path) -> None:
    real = EnrolmentToken.parse(running.invite("alpha"))
    forged = EnrolmentToken("alpha", "0" * 12, "x" * 32, real.ca_sha256)
    wrong_secret = EnrolmentToken("alpha", real.token_id, "y" * 32, real.ca_sha256)
    for token in (forged, wrong_secret):
        with pytest.raises(Unauthenticated, match="unknown enrolment token"):
            enrol(Workdir(tmp_path / "w"), running.address, str(token), running.enrol_address, FAST)
    # The wrong secret did not burn the real token.
    enrol(Workdir(tmp_path / "ok"), running.address, str(real), running.enrol_address, FAST)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "atoll1.alpha.abc",
        "atoll2.alpha.0123456789ab." + "x" * 32 + "." + "a" * 64,
        "atoll1.Alpha!.0123456789ab." + "x" * 32 + "." + "a" * 64,
        "atoll1.alpha.0123456789ab." + "x" * 31 + "." + "a" * 64,
        "atoll1.alpha.0123456789ab." + "x" * 32 + "." + "A" * 64,
    ],
)
def test_malformed_tokens(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"token|site name"):
        EnrolmentToken.parse(text)


def test_ca_pin_mismatch_refuses_before_sending_anything(running: Any, tmp_path: Path) -> None:
    other = init_federation(tmp_path / "other", "otherfed")
    other_store = other.open_store()
    foreign = enrolment.invite(other_store, load_authority(other), "alpha", 3600)
    other_store.close()
    with pytest.raises(VerificationFailed, match="the token pins"):
        enrol(Workdir(tmp_path / "w"), running.address, str(foreign), running.enrol_address, FAST)
    assert running.coordinator.store.list_sites() == []


def _raw_enroll(running: Any, request: pb.EnrollRequest) -> None:
    ca_pem = running.coordinator.ca.cert.public_bytes(serialization.Encoding.PEM)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    options = [("grpc.ssl_target_name_override", coordinator_dns_name("testfed"))]
    with grpc.secure_channel(running.enrol_address, credentials, options=options) as channel:
        pb_grpc.FederationStub(channel).Enroll(request, timeout=5)


def test_token_for_another_site_and_bad_csr(running: Any) -> None:
    token = EnrolmentToken.parse(running.invite("alpha"))
    with pytest.raises(grpc.RpcError) as info:
        _raw_enroll(
            running, pb.EnrollRequest(token=token.credential, site_name="beta", csr_pem=b"x")
        )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "issued for site 'alpha', not 'beta'" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        _raw_enroll(
            running, pb.EnrollRequest(token=token.credential, site_name="alpha", csr_pem=b"x")
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "csr_pem" in (info.value.details() or "")
    assert running.coordinator.store.get_token(token.token_id).used_at is None


def test_certificate_from_another_ca_is_refused(running: Any, tmp_path: Path) -> None:
    other = init_federation(tmp_path / "other", "testfed")  # same name, different CA
    other_store = other.open_store()
    from coordinator.server import build_server
    from coordinator.servicer import Coordinator

    other_coordinator = Coordinator.open(other)
    bound = build_server(other_coordinator, "127.0.0.1:0", "127.0.0.1:0")
    bound.start()
    try:
        token = enrolment.invite(other_store, load_authority(other), "alpha", 3600)
        workdir = Workdir(tmp_path / "foreign")
        enrol(workdir, f"127.0.0.1:{bound.port}", str(token), f"127.0.0.1:{bound.enrol_port}", FAST)
    finally:
        bound.stop(None)
        other_store.close()
    ours = running.coordinator.ca.cert.public_bytes(serialization.Encoding.PEM)
    client = FederationClient(
        running.address,
        "testfed",
        ours,
        key_pem=workdir.key.read_bytes(),
        cert_pem=workdir.cert.read_bytes(),
        retry=FAST,
    )
    with client, pytest.raises(Unavailable):
        client.heartbeat(Heartbeat(phase="waiting"))
    assert running.coordinator.store.list_sites() == []


def test_calls_without_client_certificate(running: Any) -> None:
    ca_pem = running.coordinator.ca.cert.public_bytes(serialization.Encoding.PEM)
    # The mutual-TLS port refuses the handshake; the enrolment port serves only Enroll.
    mtls = FederationClient(running.address, "testfed", ca_pem, retry=FAST)
    with mtls, pytest.raises(Unavailable):
        mtls.get_assignment()
    plain = FederationClient(running.enrol_address, "testfed", ca_pem, retry=FAST)
    with plain, pytest.raises(Unauthenticated, match="needs mutual TLS"):
        plain.get_assignment()


def test_superseded_certificate_and_revocation(running: Any, tmp_path: Path) -> None:
    old = running.enrol(tmp_path / "old", "alpha")
    new = running.enrol(tmp_path / "new", "alpha")
    with running.client(old) as client, pytest.raises(Unauthenticated, match="superseded"):
        client.heartbeat(Heartbeat(phase="waiting"))
    running.coordinator.store.revoke_site("alpha", time.time())
    with running.client(new) as client, pytest.raises(PermissionDenied, match="revoked"):
        client.heartbeat(Heartbeat(phase="waiting"))
    with pytest.raises(PermissionDenied, match="revoked"):
        running.invite("alpha")


def test_bad_heartbeat_fields(running: Any, tmp_path: Path) -> None:
    workdir = running.enrol(tmp_path, "alpha")
    with running.client(workdir) as client:
        with pytest.raises(InvalidArgument, match="phase 'dancing'"):
            client.heartbeat(Heartbeat(phase="dancing"))
        with pytest.raises(InvalidArgument, match="past total_steps"):
            client.heartbeat(Heartbeat(phase="training", step=5, total_steps=4))


def test_second_init_refuses_and_keeps_everything(tmp_path: Path) -> None:
    state = init_federation(tmp_path / "c", "one")
    before = state.ca_cert.read_bytes(), state.ca_key.read_bytes()
    with pytest.raises(AlreadyExists, match="refusing to overwrite"):
        init_federation(tmp_path / "c", "two")
    assert (state.ca_cert.read_bytes(), state.ca_key.read_bytes()) == before
    assert state.federation() == "one"
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".init-")] == []


def test_invalid_federation_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="federation name"):
        init_federation(tmp_path / "c", "Not A Name")
    assert not (tmp_path / "c" / "federation.json").exists()


def test_workdir_reuse_skips_enrolment(running: Any, tmp_path: Path) -> None:
    workdir = running.enrol(tmp_path, "alpha")
    serial = running.coordinator.store.get_site("alpha").cert_serial
    with connect(workdir, running.address, retry=FAST) as client:
        client.heartbeat(Heartbeat(phase="waiting"))
    assert running.coordinator.store.get_site("alpha").cert_serial == serial


def test_invite_json_names_the_pin_and_expiry(
    federation: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.cli import main as coordinator_main

    before = time.time()
    argv = ["invite", "--state", str(federation.root), "lab-x", "--ttl", "2h", "--json"]
    assert coordinator_main(argv) == 0
    invited = json.loads(capsys.readouterr().out)
    token = EnrolmentToken.parse(invited["token"])
    assert (invited["site"], invited["role"], invited["federation"]) == ("lab-x", "site", "testfed")
    assert invited["ca_sha256"] == token.ca_sha256 and invited["token_id"] == token.token_id
    assert before + 7200 <= invited["expires_at"] <= time.time() + 7200
