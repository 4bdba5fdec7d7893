"""Uploads under faults and abuse: two streams on one file, a full disk, quotas, abandoned
sessions, hostile sizes, names and numbers, and a coordinator killed right after it recorded
an acceptance."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator import servicer, upload, upload_writer
from coordinator.audit import Auditor
from coordinator.audit_report import verify_store_log
from protocol.audit_log import Receipt, verify_receipt
from protocol.errors import InvalidArgument, ResourceExhausted, Unavailable
from protocol.messages import Heartbeat, UploadChunk, UploadFile
from protocol.retry import Retry
from site_agent.transfer import upload_directory

sys.path.insert(0, str(Path(__file__).parent))
from test_transfer import assigned_site, expert_dir


def _file(data: bytes, path: str = "model.safetensors") -> UploadFile:
    return UploadFile(path, len(data), hashlib.sha256(data).hexdigest())


def test_a_second_stream_on_a_file_is_refused_and_nothing_mismatched_is_accepted(
    running: Any, tmp_path: Path
) -> None:
    running.add_plan(1)
    _, client = assigned_site(running, tmp_path)
    good = os.urandom(3000)
    uid = client.begin_upload(0, [_file(good)]).upload_id
    first_sent = threading.Event()
    go_on = threading.Event()

    def slow() -> Iterator[UploadChunk]:
        yield UploadChunk(uid, "model.safetensors", 0, good[:1000])
        first_sent.set()
        go_on.wait(10)
        yield UploadChunk(uid, "model.safetensors", 1000, good[1000:])

    results: list[object] = []
    honest = threading.Thread(target=lambda: results.append(client.upload_chunks(slow())))
    honest.start()
    assert first_sent.wait(10)
    time.sleep(0.2)  # the server holds the file for the first stream
    # The attack: the same file from offset 1000 with other bytes, while the first writes.
    with pytest.raises(grpc.RpcError) as caught:
        client.upload_chunks(iter([UploadChunk(uid, "model.safetensors", 1000, b"x" * 2000)]))
    assert caught.value.code() is grpc.StatusCode.ABORTED
    assert "another stream is writing 'model.safetensors'" in (caught.value.details() or "")
    go_on.set()
    honest.join(10)
    assert results == [{"model.safetensors": 3000}]
    assert client.commit_upload(uid).accepted
    on_disk = upload_writer.upload_files_dir(running.state, uid) / "model.safetensors"
    assert on_disk.read_bytes() == good


def test_a_full_disk_makes_the_site_wait_and_finish_once_space_returns(
    running: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer, "DISK_FULL_RETRY", 0.2)
    running.add_plan(1)
    _, client = assigned_site(running, tmp_path)
    client.retry = Retry(initial=0.05, maximum=0.2, give_up_after=30)
    model = expert_dir(tmp_path / "model", {"model.safetensors": 3 << 20, "config.json": 100})
    writer = running.coordinator.writer
    space = threading.Event()
    refused = []

    def write_at(fd: int, data: bytes, offset: int) -> int:
        if not space.is_set():
            refused.append(offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)

    writer.write_at = write_at
    threading.Timer(1.5, space.set).start()
    started = time.monotonic()
    result = upload_directory(client, 0, model)
    assert result.accepted, result.reason
    assert len(refused) >= 2 and time.monotonic() - started >= 1.5
    for name in ("model.safetensors", "config.json"):
        received = upload_writer.upload_files_dir(running.state, upload_id(running)) / name
        assert received.read_bytes() == (model / name).read_bytes()


def upload_id(running: Any) -> str:
    (record,) = running.coordinator.store.list_uploads("accepted")
    return str(record.upload_id)


def test_per_site_quota_on_open_sessions_and_bytes(running: Any, tmp_path: Path) -> None:
    running.add_plan(2)
    state, store = running.state, running.coordinator.store
    running.enrol(tmp_path, "alpha")
    running.enrol(tmp_path, "beta")
    alpha, beta = store.get_site("alpha"), store.get_site("beta")
    from coordinator.assignment import get_assignment

    get_assignment(store, "testfed", "alpha")
    get_assignment(store, "testfed", "beta")
    quota = upload.UploadQuota(max_open=2, max_bytes=10_000)
    opened = [
        upload.begin(state, store, alpha, 0, [_file(bytes([i]) * 100)], quota=quota)
        for i in range(2)
    ]
    # Resuming an open session is always allowed; a third is not.
    again = upload.begin(state, store, alpha, 0, [_file(bytes([0]) * 100)], quota=quota)
    assert again.upload_id == opened[0].upload_id
    with pytest.raises(ResourceExhausted, match="2 open upload sessions"):
        upload.begin(state, store, alpha, 0, [_file(b"\x09" * 100)], quota=quota)
    # Another site's quota is its own; bytes are capped too.
    with pytest.raises(ResourceExhausted, match="past its quota of 10000"):
        upload.begin(state, store, beta, 1, [_file(b"b" * 10_001)], quota=quota)
    assert upload.begin(state, store, beta, 1, [_file(b"b" * 100)], quota=quota).state == "open"


def test_abandoned_sessions_expire_and_rejected_files_are_deleted(
    running: Any, tmp_path: Path
) -> None:
    running.add_plan(1)
    _, client = assigned_site(running, tmp_path)
    data = os.urandom(1000)
    uid = client.begin_upload(0, [_file(data)]).upload_id
    client.upload_chunks(iter([UploadChunk(uid, "model.safetensors", 0, data[:500])]))
    files = running.state.uploads_dir / uid
    assert files.exists()
    state, store = running.state, running.coordinator.store
    assert upload.prune(state, store) == []  # fresh: kept
    later = time.time() + upload.UploadQuota().abandon_after + 60
    assert upload.prune(state, store, now=later) == [uid]
    record = store.get_upload(uid)
    assert record is not None and record.state == "rejected"
    assert record.reason.startswith("abandoned: no data for")
    assert not files.exists()
    kinds = [r.event().kind for r in store.audit_events()]
    assert kinds[-1] == "rejected"
    # A rejected upload's files go at once.
    bad = os.urandom(10)
    uid2 = client.begin_upload(0, [_file(bad, "other.bin")]).upload_id
    client.upload_chunks(iter([UploadChunk(uid2, "other.bin", 0, b"y" * 10)]))
    assert not client.commit_upload(uid2).accepted
    assert not (running.state.uploads_dir / uid2).exists()


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ([UploadFile("big.bin", 1 << 63, "0" * 64)], "expected 0 to"),
        ([UploadFile("a" * 300, 1, "0" * 64)], "255 per name"),
        ([UploadFile("/".join(["d" * 200] * 6), 1, "0" * 64)], "at most 1024 bytes"),
    ],
)
def test_hostile_sizes_and_names_are_invalid_arguments(
    running: Any, tmp_path: Path, files: list[UploadFile], match: str
) -> None:
    running.add_plan(1)
    _, client = assigned_site(running, tmp_path)
    with pytest.raises(InvalidArgument, match=match):
        client.begin_upload(0, files)


@pytest.mark.parametrize("field", ["loss", "tokens_per_second", "eta_seconds"])
def test_a_heartbeat_with_nan_is_an_invalid_argument(
    running: Any, tmp_path: Path, field: str
) -> None:
    client = running.client(running.enrol(tmp_path, "alpha"))
    with pytest.raises(InvalidArgument, match=f"HeartbeatRequest.{field} nan"):
        client.heartbeat(Heartbeat(phase="training", **{field: float("nan")}))


_SERVER = """
import sys, time
from coordinator.server import build_server
from coordinator.servicer import Coordinator
from coordinator.state import StateDir
coordinator = Coordinator.open(StateDir(__import__("pathlib").Path(sys.argv[1])))
coordinator.acceptance_checks = ()  # unsigned test uploads (signing: tests/test_audit.py)
bound = build_server(coordinator, "127.0.0.1:0", "127.0.0.1:0")
bound.start()
print(bound.port, flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_kill_9_after_the_acceptance_is_recorded_loses_nothing(
    running: Any, tmp_path: Path
) -> None:
    running.add_plan(1)
    workdir, client = assigned_site(running, tmp_path)
    client.close()
    state = running.state
    model = expert_dir(tmp_path / "model", {"model.safetensors": 1 << 20, "config.json": 64})
    env = {**os.environ, "ATOLL_FAULTS": "commit-recorded"}

    def start(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
        process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(state.root)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert process.stdout is not None
        return process, f"127.0.0.1:{process.stdout.readline().strip()}"

    from site_agent.agent import connect

    doomed, address = start(env)
    retry = Retry(initial=0.05, maximum=0.2, give_up_after=1.0)
    with (
        connect(workdir, address, retry) as client,
        pytest.raises(Unavailable, match="unreachable"),
    ):
        upload_directory(client, 0, model)  # the commit kills the coordinator
    assert doomed.wait(10) == -9
    (record,) = state.open_store().list_uploads()
    assert record.state == "accepted"  # recorded before the kill
    revived, address = start({k: v for k, v in os.environ.items() if k != "ATOLL_FAULTS"})
    try:
        with connect(workdir, address, retry) as client:
            result = upload_directory(client, 0, model)  # the site simply tries again
    finally:
        revived.kill()
        revived.wait()
    assert result.accepted
    receipt = Receipt.from_json(json.loads(result.receipt_json))
    store = state.open_store()
    auditor = Auditor.open(state, store)
    verify_receipt(receipt, auditor.public_key)
    assert receipt.event.details["upload_id"] == record.upload_id
    assert verify_store_log(store, auditor.log_id, auditor.public_key).verified
    accepted = [r for r in store.audit_events() if r.event().kind == "accepted"]
    assert len(accepted) == 1
    files = upload_writer.upload_files_dir(state, record.upload_id)
    assert (files / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def test_coordinator_uploads_lists_and_prunes(
    running: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from coordinator.cli import main

    running.add_plan(1)
    _, client = assigned_site(running, tmp_path)
    data = os.urandom(100)
    uid = client.begin_upload(0, [_file(data)]).upload_id
    state = str(running.state.root)
    assert main(["uploads", "--state", state, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [u["upload_id"] for u in listed["uploads"]] == [uid] and listed["deleted"] == []
    assert listed["uploads"][0]["state"] == "open"
    assert main(["uploads", "--state", state, "--prune", "--older-than", "0s", "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["deleted"] == [uid]
    assert pruned["uploads"][0]["state"] == "rejected"
    assert not pruned["uploads"][0]["files_on_disk"]
