"""Artifact downloads and upload sessions over real gRPC + mutual TLS, including the bad
chunks, bad paths and interrupted connections they must survive."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from protocol.download import download_artifact
from protocol.errors import InvalidArgument, NotFound, PermissionDenied, VerificationFailed
from protocol.messages import ArtifactRef, UploadChunk, UploadFile
from protocol.retry import Retry
from site_agent.agent import connect
from site_agent.transfer import directory_manifest, upload_directory

sys.path.insert(0, str(Path(__file__).parent))
from tcp_proxy import CuttingProxy


def assigned_site(running: Any, tmp_path: Path, name: str = "alpha") -> Any:
    # Transfer mechanics only: these uploads are unsigned, so the provenance check is off
    # (signed experts and their acceptance: tests/test_audit_acceptance.py).
    running.coordinator.acceptance_checks = ()
    workdir = running.enrol(tmp_path, name)
    client = running.client(workdir)
    assert client.get_assignment().expert_index is not None
    return workdir, client


def expert_dir(root: Path, sizes: dict[str, int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size))
    return root


def test_download_verifies_and_resumes(running: Any, tmp_path: Path) -> None:
    payload = os.urandom(3 * (1 << 20) + 17)
    running.add_plan(2, {"centroids.safetensors": payload, "expert-1.json": b"{}"})
    _workdir, client = assigned_site(running, tmp_path)
    reply = client.get_assignment()
    names = {a.name for a in reply.artifacts}
    assert names == {"partition/centroids.safetensors"}  # expert-1's shard is not ours
    ref = next(a for a in reply.artifacts if a.name.endswith("centroids.safetensors"))
    dest = tmp_path / "dl"
    part = dest / "partition" / "centroids.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(payload[: 1 << 20])  # an earlier, interrupted download
    path = download_artifact(client, ref, dest)
    assert path.read_bytes() == payload and not part.exists()
    with pytest.raises(PermissionDenied, match="belongs to expert 1"):
        download_artifact(client, ArtifactRef("partition/expert-1.json", 2, "0" * 64), dest)
    with pytest.raises(NotFound):
        download_artifact(client, ArtifactRef("partition/nothing", 2, "0" * 64), dest)
    client.close()


def test_download_detects_tampering(running: Any, tmp_path: Path) -> None:
    running.add_plan(1, {"centroids.safetensors": b"A" * 5000})
    _, client = assigned_site(running, tmp_path)
    ref = client.get_assignment().artifacts[0]
    (running.state.partition_dir / "centroids.safetensors").write_bytes(b"B" * 5000)
    with pytest.raises(VerificationFailed, match="expected sha256"):
        download_artifact(client, ref, tmp_path / "dl")
    assert list((tmp_path / "dl").rglob("*.part")) == []
    client.close()


def test_upload_commit_and_idempotent_recommit(running: Any, tmp_path: Path) -> None:
    running.add_plan(1)
    _, client = assigned_site(running, tmp_path)
    model = expert_dir(tmp_path / "expert", {"model.safetensors": 2_500_000, "config.json": 40})
    result = upload_directory(client, 0, model)
    assert result.accepted, result.reason
    status = client.begin_upload(0, directory_manifest(model))
    assert status.state == "accepted"
    again = client.commit_upload(status.upload_id)
    assert again.accepted and again.receipt_json == result.receipt_json
    stored = running.state.uploads_dir / status.upload_id / "files" / "model.safetensors"
    assert stored.read_bytes() == (model / "model.safetensors").read_bytes()
    client.close()


def test_bad_chunks_are_rejected_and_keep_what_was_received(running: Any, tmp_path: Path) -> None:
    running.add_plan(1)
    _, client = assigned_site(running, tmp_path)
    data = os.urandom(1000)
    files = [UploadFile("model.safetensors", 1000, hashlib.sha256(data).hexdigest())]
    status = client.begin_upload(0, files)
    uid = status.upload_id
    assert client.upload_chunks(iter([UploadChunk(uid, "model.safetensors", 0, data[:400])])) == {
        "model.safetensors": 400
    }
    with pytest.raises(InvalidArgument, match="expected offset 400"):
        client.upload_chunks(iter([UploadChunk(uid, "model.safetensors", 100, b"x" * 10)]))
    with pytest.raises(InvalidArgument, match="past its declared size"):
        client.upload_chunks(iter([UploadChunk(uid, "model.safetensors", 400, b"x" * 601)]))
    with pytest.raises(NotFound, match="not in its file list"):
        client.upload_chunks(iter([UploadChunk(uid, "../../etc/passwd", 0, b"x")]))
    with pytest.raises(NotFound, match="unknown upload id"):
        client.upload_chunks(iter([UploadChunk("f" * 32, "model.safetensors", 0, b"x")]))
    incomplete = client.commit_upload(uid)
    assert not incomplete.accepted and "incomplete" in incomplete.reason
    assert client.begin_upload(0, files).received == {"model.safetensors": 400}
    client.upload_chunks(iter([UploadChunk(uid, "model.safetensors", 400, data[400:])]))
    assert client.commit_upload(uid).accepted
    client.close()


def test_digest_mismatch_rejects_precisely(running: Any, tmp_path: Path) -> None:
    running.add_plan(1)
    _, client = assigned_site(running, tmp_path)
    model = expert_dir(tmp_path / "expert", {"model.safetensors": 3000})
    manifest = directory_manifest(model)
    (model / "model.safetensors").write_bytes(os.urandom(3000))  # changed after hashing
    result = upload_directory(client, 0, model, files=manifest)
    assert not result.accepted
    assert result.reason.startswith("digest mismatch for model.safetensors: expected sha256")
    assert client.commit_upload(client.begin_upload(0, manifest).upload_id).accepted is False
    client.close()


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "a\\b", "./x", "a//b", ""])
def test_begin_upload_refuses_unsafe_paths(running: Any, tmp_path: Path, path: str) -> None:
    running.add_plan(1)
    _, client = assigned_site(running, tmp_path)
    with pytest.raises(InvalidArgument, match="upload file path"):
        client.begin_upload(0, [UploadFile(path, 1, "0" * 64)])
    client.close()


def test_upload_rules_between_sites(running: Any, tmp_path: Path) -> None:
    running.add_plan(2)
    _, alpha = assigned_site(running, tmp_path / "a", "alpha")
    _, beta = assigned_site(running, tmp_path / "b", "beta")
    files = [UploadFile("model.safetensors", 4, hashlib.sha256(b"abcd").hexdigest())]
    with pytest.raises(PermissionDenied, match="cannot upload expert 1"):
        alpha.begin_upload(1, files)
    uid = alpha.begin_upload(0, files).upload_id
    with pytest.raises(NotFound, match="unknown upload id"):
        beta.upload_chunks(iter([UploadChunk(uid, "model.safetensors", 0, b"abcd")]))
    with pytest.raises(NotFound, match="unknown upload id"):
        beta.commit_upload(uid)
    assert running.coordinator.store.get_upload(uid).received["model.safetensors"] == 0
    alpha.close()
    beta.close()


def test_upload_interrupted_at_half_resumes_from_received_offset(
    running: Any, tmp_path: Path
) -> None:
    running.add_plan(1)
    workdir, direct = assigned_site(running, tmp_path)
    direct.close()
    size = 8 << 20
    model = expert_dir(tmp_path / "expert", {"model.safetensors": size})
    proxy = CuttingProxy(running.bound.port, cut_after=size // 2)
    try:
        retry = Retry(initial=0.05, maximum=0.2, give_up_after=10)
        with connect(workdir, f"127.0.0.1:{proxy.port}", retry=retry) as client:
            result = upload_directory(client, 0, model)
    finally:
        proxy.close()
    assert result.accepted, result.reason
    assert proxy.cuts >= 1
    # Resumed, not restarted: well under two copies of the file crossed the link.
    assert proxy.forwarded < size * 1.75
