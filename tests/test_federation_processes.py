"""The acceptance flow with real processes: `coordinator init/invite/serve` and two
`site-agent join` processes on loopback; the coordinator is killed and restarted and both
sites carry on without enrolling again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator.artifacts import register_artifact
from coordinator.state import StateDir
from coordinator.store import PlanRecord

sys.path.insert(0, str(Path(__file__).parent))
from conftest import record_test_recipe

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status(state: Path) -> dict[str, Any]:
    return json.loads(run(str(BIN / "coordinator"), "status", "--state", str(state), "--json"))


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_sites_survive_a_coordinator_restart(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    coordinator = str(BIN / "coordinator")
    run(coordinator, "init", "--state", str(state), "--federation", "loopback")
    tokens = [run(coordinator, "invite", "--state", str(state), name).strip() for name in "ab"]
    assert all(t.startswith("atoll1.") and "\n" not in t for t in tokens)
    port, enrol_port = free_port(), free_port()
    listen = ["--listen", f"127.0.0.1:{port}", "--enrol-listen", f"127.0.0.1:{enrol_port}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def serve() -> subprocess.Popen[bytes]:
        log = (tmp_path / "serve.log").open("ab")
        return subprocess.Popen(
            [coordinator, "serve", "--state", str(state), *listen, "--heartbeat-seconds", "1"],
            stdout=log,
            stderr=log,
            env=env,
        )

    server = serve()
    sites = []
    try:
        for name, token in zip("ab", tokens, strict=True):
            log = (tmp_path / f"site-{name}.log").open("ab")
            sites.append(
                subprocess.Popen(
                    [
                        str(BIN / "site-agent"),
                        "join",
                        "--coordinator",
                        f"127.0.0.1:{port}",
                        "--enrol-address",
                        f"127.0.0.1:{enrol_port}",
                        "--token",
                        token,
                        "--workdir",
                        str(tmp_path / f"site-{name}"),
                    ],
                    stdout=log,
                    stderr=log,
                    env=env,
                )
            )

        def heartbeating(phase: str, after: float = 0.0) -> bool:
            rows = status(state)["sites"]
            return len(rows) == 2 and all(
                r["phase"] == phase and (r["last_heartbeat"] or 0) > after and not r["silent"]
                for r in rows
            )

        wait_for("both sites heartbeating", lambda: heartbeating("waiting"))
        serials = {s.name: s.cert_serial for s in StateDir(state).open_store().list_sites()}

        # Partition (as `coordinator partition` records it, from another process): both sites
        # pick up their slot and verified artifacts while the coordinator runs.
        store = StateDir(state).open_store()
        shard = state / "partition" / "centroids.safetensors"
        shard.parent.mkdir()
        shard.write_bytes(os.urandom(100_000))
        register_artifact(StateDir(state), store, "partition/centroids.safetensors", shard)
        store.put_plan(PlanRecord("cd" * 32, 2, time.time()))
        record_test_recipe(store)
        store.close()
        wait_for("both sites ready", lambda: heartbeating("ready"))
        assert sorted(r["expert"] for r in status(state)["sites"]) == [0, 1]

        server.send_signal(signal.SIGKILL)
        server.wait(10)
        time.sleep(2)
        restarted_at = time.time()
        server = serve()
        wait_for("heartbeats after the restart", lambda: heartbeating("ready", restarted_at))
        assert all(site.poll() is None for site in sites)
        after = {s.name: s.cert_serial for s in StateDir(state).open_store().list_sites()}
        assert after == serials  # nobody enrolled again
        for name in "ab":
            site_status = json.loads(
                run(
                    str(BIN / "site-agent"),
                    "status",
                    "--workdir",
                    str(tmp_path / f"site-{name}"),
                    "--json",
                )
            )
            assert site_status["phase"] == "ready"
            assert (
                tmp_path / f"site-{name}" / "artifacts" / "partition" / "centroids.safetensors"
            ).exists()
    finally:
        for site in sites:
            site.send_signal(signal.SIGTERM)
        codes = [site.wait(15) for site in sites]
        server.send_signal(signal.SIGTERM)
        server.wait(15)
    assert codes == [0, 0]
