"""Operating the coordinator: metrics, health, the status schema, certificate renewal, the
dashboard's access rule, and backup/restore — against a real server on loopback (mutual TLS,
SQLite) with sites enrolled through the real path."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import FAST_FAIL, Running
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from prometheus_client.parser import text_string_to_metric_families
from test_audit import SHARDS, Site, signed_expert

from coordinator import backup, health
from coordinator.cli import main as coordinator_main
from coordinator.dashboard import start_dashboard
from coordinator.metrics import start_exporter
from coordinator.server import build_server
from coordinator.servicer import Coordinator
from coordinator.state import StateDir
from protocol.client import FederationClient
from protocol.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    VerificationFailed,
)
from protocol.identity import coordinator_dns_name
from protocol.messages import Heartbeat, UploadChunk
from protocol.x509 import new_p256_key
from site_agent import renewal
from site_agent.agent import Agent, connect
from site_agent.transfer import directory_manifest, upload_directory


@dataclass
class Fed:
    running: Running
    alpha: Site  # expert 0
    beta: Site  # expert 1

    @property
    def store(self) -> Any:
        return self.running.coordinator.store


@pytest.fixture
def fed(running: Running, tmp_path: Path) -> Iterator[Fed]:
    running.add_plan(2, SHARDS)
    sites = []
    for name in ("alpha", "beta"):
        workdir = running.enrol(tmp_path, name)
        client = running.client(workdir)
        sites.append(Site(workdir, client, client.get_assignment()))
    yield Fed(running, *sites)
    for site in sites:
        site.client.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_are_scraped_and_match_the_federation(fed: Fed, tmp_path: Path) -> None:
    fed.beta.client.heartbeat(Heartbeat(phase="training", step=3, total_steps=10, loss=2.0))
    with pytest.raises(InvalidArgument):
        fed.beta.client.heartbeat(Heartbeat(phase="dancing"))
    fed.alpha.client.heartbeat(Heartbeat(phase="uploading"))
    expert = signed_expert(tmp_path / "expert-0", fed.alpha)
    result = upload_directory(fed.alpha.client, 0, expert)
    assert result.accepted, result.reason
    uploaded = sum(f.size for f in directory_manifest(expert))

    exporter = start_exporter(fed.running.bound.metrics, "127.0.0.1:0")
    try:
        metrics = scrape(exporter.port)
        with pytest.raises(FailedPrecondition, match=r"--metrics-listen .* cannot listen"):
            start_exporter(fed.running.bound.metrics, f"127.0.0.1:{exporter.port}")
    finally:
        exporter.stop()

    store = fed.store
    assert metrics[("atoll_sites", (("phase", "training"),))] == 1
    assert metrics[("atoll_sites", (("phase", "uploading"),))] == 1
    assert metrics[("atoll_sites", (("phase", "done"),))] == 0
    assert metrics[("atoll_experts", ())] == 2
    assert metrics[("atoll_experts_accepted", ())] == 1
    assert metrics[("atoll_uploads_in_progress", ())] == 0
    assert metrics[("atoll_upload_received_bytes_total", ())] == uploaded
    assert metrics[("atoll_audit_log_events", ())] == store.audit_size()
    assert metrics[("atoll_sites_revoked", ())] == 0
    ok, bad = (
        (("code", "OK"), ("method", "Heartbeat")),
        (
            ("code", "INVALID_ARGUMENT"),
            ("method", "Heartbeat"),
        ),
    )
    assert metrics[("atoll_rpc_requests_total", ok)] == 2
    assert metrics[("atoll_rpc_requests_total", bad)] == 1
    commit = (("code", "OK"), ("method", "CommitUpload"))
    assert metrics[("atoll_rpc_duration_seconds_count", commit)] == 1
    ca = x509.load_pem_x509_certificate(fed.running.state.ca_cert.read_bytes())
    expiry = metrics[("atoll_certificate_expiry_timestamp_seconds", (("kind", "ca"),))]
    assert expiry == ca.not_valid_after_utc.timestamp()
    assert ("atoll_certificate_expiry_timestamp_seconds", (("kind", "site"),)) in metrics


def test_health_service_on_both_ports(fed: Fed) -> None:
    running = fed.running
    ca = running.state.ca_cert.read_bytes()
    override = [("grpc.ssl_target_name_override", coordinator_dns_name("testfed"))]
    # The enrolment port: server TLS, so a probe needs only the CA.
    with grpc.secure_channel(
        running.enrol_address, grpc.ssl_channel_credentials(ca), options=override
    ) as channel:
        assert health.check(channel) == "SERVING"
        assert health.check(channel, health.SERVICE) == "SERVING"
    # The mutual-TLS port answers a caller with a federation certificate.
    workdir = fed.alpha.workdir
    credentials = grpc.ssl_channel_credentials(
        ca, workdir.key.read_bytes(), workdir.cert.read_bytes()
    )
    with grpc.secure_channel(running.address, credentials, options=override) as channel:
        assert health.check(channel, health.SERVICE) == "SERVING"
        running.bound.health.enter_graceful_shutdown()
        assert health.check(channel, health.SERVICE) == "NOT_SERVING"


# The documented `status --json` schema (coordinator/status.py): fields may be added under a
# new schema name, never renamed or dropped under this one.
STATUS_KEYS = {"schema", "federation", "generated_at", "plan", "sites", "experts", "uploads",
               "certificates", "audit"}  # fmt: skip
SITE_KEYS = {"site", "spiffe_id", "enrolled_at", "revoked", "expert", "phase", "step",
             "total_steps", "loss", "eta_seconds", "last_heartbeat", "seconds_since_heartbeat",
             "silent", "message", "certificate_expires_at"}  # fmt: skip
EXPERT_KEYS = {"index", "site", "phase", "accepted_upload_id", "accepted_model_digest",
               "accepted_at", "accepted_log_index", "site_revoked"}  # fmt: skip
UPLOAD_KEYS = {"upload_id", "site", "expert", "state", "received_bytes", "total_bytes",
               "created_at", "updated_at", "reason"}  # fmt: skip


def status_json(state: StateDir, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert coordinator_main(["status", "--state", str(state.root), "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_status_json_schema_names_the_accepted_experts(
    fed: Fed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed.beta.client.heartbeat(Heartbeat(phase="training", step=4, total_steps=8, loss=1.5))
    result = upload_directory(fed.alpha.client, 0, signed_expert(tmp_path / "e0", fed.alpha))
    assert result.accepted, result.reason
    status = status_json(fed.running.state, capsys)

    assert set(status) == STATUS_KEYS and status["schema"] == "atoll.status/v1"
    assert all(set(site) == SITE_KEYS for site in status["sites"])
    assert all(set(expert) == EXPERT_KEYS for expert in status["experts"])
    assert all(set(upload) == UPLOAD_KEYS for upload in status["uploads"])
    assert set(status["certificates"]) == {"ca_expires_at", "server_expires_at", "lifetime_days"}
    assert set(status["audit"]) == {"events", "last_checkpoint_size", "last_checkpoint_at"}

    first, second = status["experts"]
    (accepted,) = fed.store.list_uploads("accepted")
    receipt = json.loads(result.receipt_json)
    assert first["index"] == 0 and first["site"] == "alpha" and first["phase"] == "accepted"
    assert first["accepted_upload_id"] == accepted.upload_id
    assert first["accepted_at"] == receipt["event"]["at"]
    assert (
        first["accepted_model_digest"]
        == receipt["event"]["details"]["provenance"]["model_root_digest"]
    )
    assert second == {
        "index": 1, "site": "beta", "phase": "training", "accepted_upload_id": None,
        "accepted_model_digest": None, "accepted_at": None, "accepted_log_index": None,
        "site_revoked": False,
    }  # fmt: skip
    assert status["certificates"]["lifetime_days"] == 30
    assert status["certificates"]["ca_expires_at"] > status["sites"][0]["certificate_expires_at"]
    assert status["audit"]["events"] == fed.store.audit_size()


# -- certificate renewal -----------------------------------------------------------------


def test_renewal_is_audited_keeps_signed_work_and_refuses_revoked(
    fed: Fed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha, beta = fed.alpha, fed.beta
    expert = signed_expert(tmp_path / "e0", alpha)  # signed with the certificate before renewal
    old_serial = fed.store.get_site("alpha").cert_serial
    old_cert = alpha.workdir.cert.read_bytes()
    assert not renewal.due(alpha.workdir.cert.read_bytes())  # a fresh 30-day certificate

    # The agent renews at its next heartbeat once a third of the lifetime is left.
    monkeypatch.setattr(renewal, "RENEW_WHEN_LEFT", 1.01)
    agent = Agent(alpha.workdir, alpha.client)
    agent.beat()
    assert agent.client is not alpha.client  # a new channel with the new certificate
    renewed = fed.store.get_site("alpha")
    assert renewed.cert_serial != old_serial
    cert = x509.load_pem_x509_certificate(alpha.workdir.cert.read_bytes())
    assert format(cert.serial_number, "x") == renewed.cert_serial
    (event,) = [r.event() for r in fed.store.audit_events() if r.event().kind == "renewed"]
    assert event.details["site"] == "alpha" and event.details["cert_serial"] == renewed.cert_serial
    old = FederationClient(
        fed.running.address,
        "testfed",
        alpha.workdir.ca.read_bytes(),
        key_pem=alpha.workdir.key.read_bytes(),
        cert_pem=old_cert,
        retry=FAST_FAIL,
    )
    with old, pytest.raises(Unauthenticated, match="superseded"):
        old.get_assignment()  # the old certificate is refused from now on

    assert agent.client is not None
    result = upload_directory(agent.client, 0, expert)
    assert result.accepted, result.reason  # signed before the renewal, same key: accepted
    agent.client.close()

    coordinator_main(["revoke", "--state", str(fed.running.state.root), "beta"])
    with pytest.raises(PermissionDenied, match="revoked"):
        renewal.renew(beta.workdir, beta.client)
    # The agent of a revoked site is not renewed; its heartbeat is refused.
    revoked_agent = Agent(beta.workdir, beta.client)
    with pytest.raises(PermissionDenied, match="'beta' is revoked"):
        revoked_agent.beat()
    assert revoked_agent.client is beta.client
    assert [r.event().kind for r in fed.store.audit_events()].count("renewed") == 1


def test_renewal_refuses_another_key_and_an_expired_certificate(fed: Fed) -> None:
    alpha = fed.alpha
    other = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "alpha")])
    )

    csr = other.sign(new_p256_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidArgument, match="not the key of the current certificate"):
        alpha.client.renew_certificate(csr)
    # An expired certificate cannot even connect: the TLS handshake refuses it.
    ca = fed.running.coordinator.ca
    key_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "alpha")]))
        .sign(
            serialization.load_pem_private_key(alpha.workdir.key.read_bytes(), None),  # type: ignore[arg-type]
            hashes.SHA256(),
        )
        .public_bytes(serialization.Encoding.PEM)
    )
    expired = ca.issue_site_certificate("alpha", key_csr, validity=-dt.timedelta(minutes=1))
    alpha.workdir.cert.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    client = connect(alpha.workdir, fed.running.address, retry=FAST_FAIL)
    with client, pytest.raises(Unavailable, match="unreachable"):
        renewal.renew(alpha.workdir, client)
    assert fed.store.get_site("alpha").cert_serial != format(expired.serial_number, "x")


# -- the dashboard's access rule ---------------------------------------------------------


def test_dashboard_needs_a_token_off_loopback(fed: Fed) -> None:
    state, store = fed.running.state, fed.store
    with pytest.raises(FailedPrecondition, match="non-loopback address needs a token"):
        start_dashboard(state, store, "0.0.0.0:0")
    token = "t" * 32
    dashboard = start_dashboard(state, store, "0.0.0.0:0", token=token)
    try:
        url = f"http://127.0.0.1:{dashboard.port}/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        with urllib.request.urlopen(f"{url}?token={token}", timeout=10) as reply:
            page = reply.read().decode()
        assert "alpha" in page and "beta" in page and "Federation testfed" in page
        request = urllib.request.Request(
            f"{url}api/status", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert json.loads(reply.read())["schema"] == "atoll.status/v1"
        with pytest.raises(FailedPrecondition, match="cannot listen"):
            start_dashboard(state, store, f"127.0.0.1:{dashboard.port}")
    finally:
        dashboard.stop()


# -- backup and restore ------------------------------------------------------------------


def _partial_upload(site: Site, directory: Path, limit: int) -> str:
    """Begins an upload and sends its first ``limit`` bytes (an interrupted upload)."""
    files = directory_manifest(directory)
    status = site.client.begin_upload(site.assignment.expert_index, files)
    first = files[0] if files[0].size > limit else max(files, key=lambda f: f.size)
    data = (directory / first.path).read_bytes()[:limit]
    site.client.upload_chunks(iter([UploadChunk(status.upload_id, first.path, 0, data)]))
    return status.upload_id


@pytest.mark.slow
def test_backup_during_an_upload_then_wipe_restore_and_finish(
    fed: Fed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = fed.running.state
    alpha_expert = signed_expert(tmp_path / "e0", fed.alpha)
    upload_id = _partial_upload(fed.alpha, alpha_expert, 200)
    out = tmp_path / "backup.tar"
    assert coordinator_main(["backup", "--state", str(state.root), "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    # The coordinator keeps serving: more of the upload arrives after the snapshot.
    status = fed.alpha.client.begin_upload(0, directory_manifest(alpha_expert))
    assert status.upload_id == upload_id and max(status.received.values()) == 200

    fed.running.bound.stop(grace=None)
    fed.running.coordinator.store.close()
    shutil.rmtree(state.root)  # the disk is lost
    assert coordinator_main(["restore", "--from", str(out), "--state", str(state.root)]) == 0

    coordinator = Coordinator.open(state, heartbeat_seconds=1)
    bound = build_server(coordinator, "127.0.0.1:0", "127.0.0.1:0")
    bound.start()
    try:
        address = f"127.0.0.1:{bound.port}"
        alpha = connect(fed.alpha.workdir, address, retry=FAST_FAIL)
        beta = connect(fed.beta.workdir, address, retry=FAST_FAIL)
        resumed = alpha.begin_upload(0, directory_manifest(alpha_expert))
        assert resumed.upload_id == upload_id and max(resumed.received.values()) == 200
        assert upload_directory(alpha, 0, alpha_expert).accepted
        beta_site = Site(fed.beta.workdir, beta, fed.beta.assignment)
        beta_result = upload_directory(beta, 1, signed_expert(tmp_path / "e1", beta_site))
        assert beta_result.accepted, beta_result.reason
        alpha.close()
        beta.close()
    finally:
        bound.stop(grace=None)
        coordinator.store.close()
    status_doc = status_json(state, capsys)
    assert [e["phase"] for e in status_doc["experts"]] == ["accepted", "accepted"]
    assert status_doc["experts"][0]["accepted_upload_id"] == upload_id
    capsys.readouterr()
    assert coordinator_main(["audit", "--state", str(state.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["log"]["verified"] is True


@pytest.fixture
def archive(fed: Fed, tmp_path: Path) -> Path:
    out = tmp_path / "backup.tar"
    backup.backup(fed.running.state, out)
    return out


def _rewrite(source: Path, target: Path, change: Any) -> None:
    """Copies the tar entry by entry, letting ``change(name, data)`` alter one."""
    with tarfile.open(source) as old, tarfile.open(target, "w") as new:
        for member in old:
            handle = old.extractfile(member)
            data = handle.read() if handle else b""
            data = change(member.name, data)
            member.size = len(data)
            new.addfile(member, io.BytesIO(data))


def test_restore_refuses_bad_backups_and_a_non_empty_directory(
    archive: Path, tmp_path: Path
) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes").write_text("x")
    with pytest.raises(AlreadyExists, match="not empty"):
        backup.restore(archive, tmp_path / "busy")

    tampered = tmp_path / "tampered.tar"
    _rewrite(archive, tampered, lambda n, d: d.replace(b'"a"', b'"z"') if n.endswith(
        "expert-0.json") else d)  # fmt: skip
    with pytest.raises(VerificationFailed, match=r"'partition/expert-0.json'.*altered"):
        backup.restore(tampered, tmp_path / "t")
    assert not (tmp_path / "t").exists()

    data = archive.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VerificationFailed, match="truncated"):
        backup.restore(truncated, tmp_path / "u")
    assert not (tmp_path / "u").exists()

    with pytest.raises(AlreadyExists, match="refusing to overwrite"):
        backup.backup(StateDir(tmp_path / "coordinator"), archive)


def test_encrypted_keys_need_the_passphrase(fed: Fed, tmp_path: Path) -> None:
    out = tmp_path / "sealed.tar"
    result = backup.backup(fed.running.state, out, passphrase=b"correct horse battery")
    assert result.encrypted_keys
    with tarfile.open(out) as tar:
        handle = tar.extractfile("ca/ca.key")
        assert handle is not None and b"ENCRYPTED PRIVATE KEY" in handle.read()
    with pytest.raises(InvalidArgument, match=r"'ca/ca\.key' is encrypted"):
        backup.restore(out, tmp_path / "a")
    with pytest.raises(VerificationFailed, match="cannot decrypt"):
        backup.restore(out, tmp_path / "b", passphrase=b"wrong horse battery")
    backup.restore(out, tmp_path / "c", passphrase=b"correct horse battery")
    restored = StateDir(tmp_path / "c")
    assert restored.ca_key.read_bytes() == fed.running.state.ca_key.read_bytes()
    assert restored.ca_key.stat().st_mode & 0o777 == 0o600
