"""What the loopback benchmarks share: a `coordinator serve` process on free ports, a recorded
recipe (these benchmarks never train), and the coordinator's peak memory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from coordinator.state import StateDir
from coordinator.store import Store

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found")


def record_recipe(store: Store, name: str) -> dict[str, Any]:
    """A recipe description as `coordinator recipe` records it (no base model: nothing trains)."""
    recipe: dict[str, Any] = {
        "name": name,
        "sha256": "12" * 32,
        "artifact": "recipe/recipe.yaml",
        "base_model": {"digest": "34" * 32, "served": False, "files": 1, "bytes": 1},
    }
    store.set_meta("recipe", json.dumps(recipe))
    return recipe


def start_coordinator(state: StateDir) -> tuple[subprocess.Popen[bytes], int, int]:
    """`coordinator serve` on two free loopback ports: (process, port, enrolment port)."""
    port, enrol_port = free_port(), free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "serve",
            "--state",
            str(state.root),
            "--listen",
            f"127.0.0.1:{port}",
            "--enrol-listen",
            f"127.0.0.1:{enrol_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    return server, port, enrol_port
