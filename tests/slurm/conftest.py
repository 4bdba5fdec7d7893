"""A one-node Slurm cluster on localhost for the session: munged, slurmctld and slurmd from
Debian's slurm-wlm and munge packages (``.ci/run`` installs them), started here with a private
key, socket, state directory and free ports, from ``deploy/slurm/slurm.conf``'s settings.

The tests skip, saying why, where the daemons are missing or cannot run (not root)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONF = REPO / "deploy" / "slurm" / "slurm.conf"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")


@dataclass(frozen=True)
class SlurmCluster:
    """The running test cluster (``SLURM_CONF`` points at its config for the session)."""

    root: Path
    conf: Path
    node: str

    def scontrol(self, *args: str) -> str:
        done = subprocess.run(
            ["scontrol", *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"scontrol {' '.join(args)}: {done.stderr}"
        return done.stdout

    def job(self, job_id: int) -> dict[str, str]:
        fields: dict[str, str] = {}
        for token in self.scontrol("show", "job", "--oneliner", str(job_id)).split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _why_not() -> str | None:
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"Slurm test cluster: {', '.join(missing)} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "Slurm test cluster: slurmd must run as root to start jobs"
    return None


def _config(root: Path, node: str) -> str:
    """deploy/slurm/slurm.conf with this session's paths, ports and node."""
    text = EXAMPLE_CONF.read_text()
    values = {
        "@ROOT@": str(root),
        "@NODE@": node,
        "@CPUS@": str(os.cpu_count() or 1),
        "@CTLD_PORT@": str(_free_port()),
        "@SLURMD_PORT@": str(_free_port()),
        "@USER@": "root",
    }
    for key, value in values.items():
        text = text.replace(key, value)
    return text


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    for name in ("munge", "state", "spool", "log"):
        (root / name).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_config(root, node))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    logs = (root / "log" / "daemons.log").open("ab")
    munge = root / "munge"
    commands = [
        # --force: pytest's private temporary directory is not world-searchable, which munged
        # otherwise refuses for its socket (only root uses the socket here).
        ["munged", "-F", "--force", f"--socket={munge / 'munge.sock'}", f"--key-file={key}",
         f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
         f"--seed-file={munge / 'seed'}"],
        ["slurmctld", "-D", "-c", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf), "-N", node],
    ]  # fmt: skip
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        for command in commands:
            daemons.append(subprocess.Popen(command, stdout=logs, stderr=logs))
            if command[0] == "munged":
                _wait_for(lambda: (munge / "munge.sock").exists(), "munged's socket", root, daemons)
        _wait_for(lambda: _idle(node), f"node {node} idle in sinfo", root, daemons)
        yield SlurmCluster(root, conf, node)
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        logs.close()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _idle(node: str) -> bool:
    done = subprocess.run(
        ["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True, check=False
    )
    return done.returncode == 0 and done.stdout.strip() in ("idle", "mix", "alloc")


def _wait_for(
    check: Callable[[], bool],
    what: str,
    root: Path,
    daemons: list[subprocess.Popen[bytes]],
    timeout: float = 60,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(d.poll() is None for d in daemons):
        if check():
            return
        time.sleep(0.3)
    logs = "\n".join(
        f"{p.name}:\n{p.read_text(errors='replace')[-2000:]}" for p in (root / "log").iterdir()
    )
    pytest.fail(f"Slurm test cluster: no {what} (a daemon exited or 60 s passed)\n{logs}")
