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

from coordinator.state import StateDir
from coordinator.store import PlanRecord
from protocol.exit_codes import ExitCode

sys.path.insert(0, str(Path(__file__).parent))

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

        # A partition plan recorded from another process while the coordinator runs: the
        # sites learn that the federation now waits for its training recipe.
        store = StateDir(state).open_store()
        store.put_plan(PlanRecord("cd" * 32, 2, time.time()))
        store.close()
        wait_for(
            "sites to see the plan",
            lambda: all("training recipe" in r["message"] for r in status(state)["sites"]),
        )

        server.send_signal(signal.SIGKILL)
        server.wait(10)
        time.sleep(2)
        restarted_at = time.time()
        server = serve()
        wait_for("heartbeats after the restart", lambda: heartbeating("waiting", restarted_at))
        assert all(site.poll() is None for site in sites)
        after = {s.name: s.cert_serial for s in StateDir(state).open_store().list_sites()}
        assert after == serials  # nobody enrolled again
        for name in "ab":
            workdir = str(tmp_path / f"site-{name}")
            report = json.loads(
                run(str(BIN / "site-agent"), "status", "--workdir", workdir, "--json")
            )
            assert report["phase"] == "waiting" and report["spiffe_id"].endswith(f"/site/{name}")
    finally:
        for site in sites:
            site.send_signal(signal.SIGTERM)
        codes = [site.wait(15) for site in sites]
        server.send_signal(signal.SIGTERM)
        server.wait(15)
    assert codes == [ExitCode.INTERRUPTED] * 2  # stopped by the signal, state saved
