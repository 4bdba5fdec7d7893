"""`site-agent join` always stops: on SIGTERM against a coordinator that never answers, on its
own give-up at first contact, and at the phase `--until` names."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import Interrupted, Unavailable
from protocol.exit_codes import ExitCode
from protocol.retry import Retry
from site_agent.agent import Agent

BIN = Path(sys.executable).parent


@pytest.fixture
def silent() -> Iterator[str]:
    """A 'coordinator' that accepts TCP connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def _join(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "site-agent"), "join", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_enrolled_join_exits_soon_after_sigterm_against_a_silent_coordinator(
    running: Any, tmp_path: Path, silent: str
) -> None:
    workdir = running.enrol(tmp_path, "alpha")
    process = _join("--workdir", str(workdir.root), "--coordinator", silent)
    assert process.stderr is not None
    while "joining from" not in process.stderr.readline():  # its signal handlers are set
        assert process.poll() is None
    time.sleep(2)  # in a call that will never be answered, or waiting to retry one
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    process.wait(timeout=30)
    assert time.monotonic() - sent < 20
    assert process.returncode == ExitCode.INTERRUPTED


@pytest.mark.slow
def test_fresh_join_gives_up_on_a_silent_coordinator_with_a_clear_error(
    running: Any, tmp_path: Path, silent: str
) -> None:
    token = running.invite("alpha")
    started = time.monotonic()
    process = _join(
        "--workdir",
        str(tmp_path / "site"),
        "--token",
        token,
        "--coordinator",
        silent,
        "--enrol-address",
        silent,
        "--first-contact-give-up",
        "5s",
    )
    _, stderr = process.communicate(timeout=120)
    assert time.monotonic() - started < 120
    assert process.returncode == ExitCode.UNAVAILABLE
    assert "TLS first contact: coordinator unreachable for" in stderr and "giving up" in stderr
    assert "no answer in 10s" in stderr


def test_join_until_ready_stops_before_training(running: Any, tmp_path: Path) -> None:
    # Every assignment names its shard; a text-only one needs no images.
    shard = b'{"samples": [{"id": "t", "conversations": []}]}'
    running.add_plan(1, {"centroids.bin": b"c" * 100, "expert-0.json": shard})
    workdir = running.enrol(tmp_path, "alpha")
    with running.client(workdir) as client:
        agent = Agent(workdir, client)
        assert agent.run(until="ready") == 0
    assert agent.phase == "ready"
    assert workdir.agent_state()["phase"] == "ready"


def test_a_stopped_retry_ends_its_wait_at_once() -> None:
    retry = Retry(initial=30, maximum=30)
    threading.Timer(0.2, retry.stop.set).start()
    started = time.monotonic()
    calls = 0

    def failing() -> None:
        nonlocal calls
        calls += 1
        raise Unavailable("down")

    with pytest.raises(Interrupted):
        retry.run("Heartbeat", failing)
    assert time.monotonic() - started < 5 and calls == 1


def test_heartbeats_continue_while_uploading(running: Any, tmp_path: Path) -> None:
    workdir = running.enrol(tmp_path, "alpha")
    store = running.coordinator.store
    with running.client(workdir) as client:
        agent = Agent(workdir, client, heartbeat_seconds=0.1)
        agent.phase = "uploading"
        with agent.beating():  # what work() wraps the upload in
            deadline = time.monotonic() + 10
            while "alpha" not in store.latest_heartbeats() and time.monotonic() < deadline:
                time.sleep(0.05)
            first = store.latest_heartbeats()["alpha"].at
            while store.latest_heartbeats()["alpha"].at == first and time.monotonic() < deadline:
                time.sleep(0.05)
    beat = store.latest_heartbeats()["alpha"]
    assert beat.phase == "uploading" and beat.at > first
