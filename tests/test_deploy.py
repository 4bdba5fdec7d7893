"""deploy/: the systemd units (systemd-analyze verify), every command line the unit, container
and compose files run (against the real CLI parsers), and the slim coordinator install
(serve without torch) in a clean venv.

Building and running the images themselves is `deploy/test-containers.sh` (podman; see
deploy/README.md for what this sandbox allows).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import venv
from pathlib import Path

import pytest
import yaml

from coordinator.cli import build_parser as coordinator_parser
from site_agent.cli import build_parser as site_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
BIN = Path(sys.executable).parent


def _unit_copy(unit: Path, into: Path, bin_dir: Path) -> Path:
    """The unit with /opt/atoll/bin pointing at ``bin_dir`` (verify checks ExecStart exists)."""
    copy = into / unit.name
    copy.write_text(unit.read_text().replace("/opt/atoll/bin/", f"{bin_dir}/"))
    return copy


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=units[0].parent,
    )


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is absent (Debian's systemd package; .ci/run installs it)",
)
def test_systemd_units_verify_clean(tmp_path: Path) -> None:
    assert [u.name for u in UNITS] == ["atoll-coordinator.service", "atoll-site-agent.service"]
    copies = [_unit_copy(unit, tmp_path, BIN) for unit in UNITS]
    result = _verify(*copies)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr
    for unit in UNITS:
        text = unit.read_text()
        for setting in ("Restart=on-failure", "StateDirectory=", "NoNewPrivileges=yes",
                        "ProtectSystem=strict", "PrivateTmp=yes", "CapabilityBoundingSet="):  # fmt: skip
            assert setting in text, f"{unit.name} lacks {setting}"

    # A unit whose ExecStart names a wrong path fails, naming it.
    (tmp_path / "bad").mkdir()
    broken = _unit_copy(UNITS[0], tmp_path / "bad", tmp_path / "no-such-venv" / "bin")
    result = _verify(broken)
    assert result.returncode != 0
    assert f"{tmp_path}/no-such-venv/bin/coordinator" in result.stderr
    assert "not executable" in result.stderr


def _exec_lines() -> list[tuple[str, list[str]]]:
    """Every command line the deploy files run, as (where, argv)."""
    found: list[tuple[str, list[str]]] = []
    env = {"ATOLL_COORDINATOR": "c:7443", "ATOLL_TOKEN": "t", "ATOLL_IMAGE_ROOT": "/data"}
    for unit in UNITS:
        joined = unit.read_text().replace("\\\n", " ")
        (line,) = re.findall(r"^ExecStart=(.*)$", joined, flags=re.M)
        for key, value in env.items():
            line = line.replace("${" + key + "}", value)
        found.append((unit.name, shlex.split(line)))
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    coordinator = compose["services"]["coordinator"]
    found.append(("compose coordinator", ["coordinator", *coordinator["command"]]))
    found.append(("compose healthcheck", coordinator["healthcheck"]["test"][1:]))
    for site in ("site-a", "site-b"):
        (script,) = compose["services"][site]["command"]
        argv = shlex.split(script.replace("$$(cat", "$(cat"))
        found.append((f"compose {site}", argv[1:]))  # after `exec`
    container = (DEPLOY / "coordinator.Containerfile").read_text().replace("\\\n", " ")
    for kind in ("CMD", "HEALTHCHECK .*? CMD"):
        for match in re.findall(rf"^{kind} (\[.*?\])\s*$", container, flags=re.M):
            argv = json.loads(match)
            found.append((f"Containerfile {kind.split()[0]}", argv))
    setup = (DEPLOY / "compose-setup.sh").read_text().replace("\\\n", " ")
    for line in re.findall(r"^\s*(coordinator .*?)(?: >.*)?$", setup, flags=re.M):
        found.append(("compose-setup.sh", shlex.split(line.replace('"', ""))))
    return found


def test_deploy_command_lines_parse_with_the_real_cli() -> None:
    lines = _exec_lines()
    assert len(lines) >= 9
    parsers = {"coordinator": coordinator_parser(), "site-agent": site_parser()}
    for where, argv in lines:
        program = Path(argv[0]).name
        if program not in parsers:  # a Containerfile CMD holds arguments only
            program, argv = "coordinator", ["coordinator", *argv]
        try:
            parsers[program].parse_args(argv[1:])
        except SystemExit as error:
            pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse ({error})")


def test_compose_runs_a_coordinator_and_two_sites() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"setup", "coordinator", "site-a", "site-b"}
    assert services["coordinator"]["image"] == "atoll-coordinator"
    assert services["site-a"]["image"] == services["site-b"]["image"] == "atoll-site-agent"
    # Sites publish nothing: they only dial out.
    assert "ports" not in services["site-a"] and "ports" not in services["site-b"]
    ports = services["coordinator"]["ports"]
    assert "7443:7443" in ports and "7444:7444" in ports
    assert all(p.startswith("127.0.0.1:") for p in ports if "9464" in p)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slim_venv() -> Path:
    """A clean venv with only deploy/coordinator-requirements.txt and the project without its
    dependencies (what the coordinator image installs), cached by the requirements' digest."""
    requirements = DEPLOY / "coordinator-requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atoll"
    target = cache / f"slim-coordinator-{digest}"
    python = target / "bin" / "python"
    if not (target / ".complete").exists():
        shutil.rmtree(target, ignore_errors=True)
        venv.create(target, with_pip=True)
        install = [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)]
        result = subprocess.run(install, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"cannot install the slim requirements here: {result.stderr[-500:]}")
        (target / ".complete").write_text("ok\n")
    return target


@pytest.mark.slow
def test_slim_coordinator_serves_without_torch(tmp_path: Path) -> None:
    slim = _slim_venv()
    python, bin_dir = slim / "bin" / "python", slim / "bin"
    # The project itself, fresh each run and without dependencies, from the files the
    # coordinator image copies (deploy/coordinator.Containerfile).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("protocol", "coordinator", "site_agent", "ensemble"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    site_packages = tmp_path / "atoll-slim"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site_packages),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHONPATH": str(site_packages),
        "HOME": str(tmp_path),
    }
    for module in ("torch", "numpy", "transformers"):
        probe = subprocess.run(
            [str(python), "-c", f"import {module}"], env=env, capture_output=True
        )
        assert probe.returncode != 0, f"{module} is importable in the slim venv"

    def coordinator(*args: str) -> str:
        run = [str(python), "-m", "coordinator.cli", *args]
        done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    state = tmp_path / "state"
    coordinator("init", "--state", str(state), "--federation", "slim")
    token = coordinator("invite", "--state", str(state), "alpha").strip()
    port, metrics = _free_port(), _free_port()
    server = subprocess.Popen(
        [
            str(python),
            "-m",
            "coordinator.cli",
            "serve",
            "--state",
            str(state),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            f"127.0.0.1:{metrics}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            health = subprocess.run(
                [
                    str(python),
                    "-m",
                    "coordinator.cli",
                    "health",
                    "--state",
                    str(state),
                    "--address",
                    f"127.0.0.1:{port + 1}",
                    "--timeout",
                    "2",
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            if health.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert health.stdout.strip() == "SERVING", health.stderr
        # A site from the full install enrols with the slim coordinator.
        join = subprocess.run(
            [
                str(BIN / "site-agent"),
                "join",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--token",
                token,
                "--workdir",
                str(tmp_path / "site"),
                "--until",
                "waiting",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert join.returncode == 0, join.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert 'atoll_rpc_requests_total{code="OK",method="Enroll"} 1.0' in text
        assert 'atoll_sites{phase="enrolled"} 1.0' in text
        status = json.loads(coordinator("status", "--state", str(state), "--json"))
        assert [s["site"] for s in status["sites"]] == ["alpha"]
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output


def _containers_unavailable() -> str:
    """Why the container test cannot run here ('' when it can)."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    base = subprocess.run(
        ["podman", "image", "exists", "localhost/atoll-debian-base:bookworm"], capture_output=True
    )
    if base.returncode != 0:
        return (
            "no local base image (registries of container images are unreachable here); "
            "`bash deploy/test-containers.sh` builds one with debootstrap, then this runs"
        )
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_containers_unavailable()), reason=_containers_unavailable())
def test_coordinator_container_builds_and_serves() -> None:
    result = subprocess.run(
        ["bash", str(DEPLOY / "test-containers.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "VENV_BIN": str(BIN), "PORT": str(_free_port())},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "containers: ok" in result.stdout
