"""Atoll's command lines, run as subprocesses (this package never imports Atoll).

Server side: ``coordinator invite/status --json``. Site side: ``site-agent status --json``
and ``site-agent join`` started detached, so that training outlives the Flower message that
started it, the ClientApp process and even the SuperNode.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

JOIN_LOG = "flower-join.log"
JOIN_PID = "flower-join.pid"


class AtollCommandError(RuntimeError):
    """An Atoll command failed; the message holds its command line and stderr."""


NOT_ENROLLED = 7  # site-agent's exit code (PRECONDITION) for a workdir with no site yet


def run_json(argv: list[str], timeout: float = 120.0, none_on: int | None = None) -> Any:
    """Runs an Atoll command that prints JSON; raises AtollCommandError naming it.
    Exit code ``none_on`` answers None instead."""
    shown = " ".join(a if not a.startswith("atoll1.") else "atoll1.…" for a in argv)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise AtollCommandError(f"`{argv[0]}` not found: set its path in the config") from None
    except subprocess.TimeoutExpired:
        raise AtollCommandError(f"`{shown}` did not finish in {timeout:.0f}s") from None
    if done.returncode == none_on:
        return None
    if done.returncode != 0:
        raise AtollCommandError(
            f"`{shown}` exited {done.returncode}: {done.stderr.strip()[-1000:]}"
        )
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as error:
        raise AtollCommandError(f"`{shown}` printed no JSON ({error})") from None


# -- the coordinator's side ----------------------------------------------------------------


def invite(coordinator: str, state: str, site: str, ttl: str) -> dict[str, Any]:
    """A one-use token for ``site``: ``token``, ``ca_sha256``, ``federation``, ``expires_at``."""
    invited: dict[str, Any] = run_json(
        [coordinator, "invite", "--state", state, site, "--ttl", ttl, "--json"]
    )
    return invited


def federation_status(coordinator: str, state: str) -> dict[str, Any]:
    """``coordinator status --json``: the plan and one row per enrolled site."""
    status: dict[str, Any] = run_json([coordinator, "status", "--state", state, "--json"])
    return status


def accepted_experts(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Accepted experts by index, from a ``coordinator status --json`` document
    (``experts``: ``site``, ``accepted_model_digest``, ``accepted_log_index``, ...)."""
    return {int(e["index"]): e for e in status["experts"] if e["phase"] == "accepted"}


# -- the site's side -----------------------------------------------------------------------


def site_status(site_agent: str, workdir: Path) -> dict[str, Any] | None:
    """``site-agent status --json``, or None while the workdir is not enrolled."""
    argv = [site_agent, "status", "--workdir", str(workdir), "--json"]
    report: dict[str, Any] | None = run_json(argv, none_on=NOT_ENROLLED)
    return report


def join_running(workdir: Path) -> int | None:
    """The pid of this workdir's detached ``site-agent join``, if it still runs."""
    try:
        pid = int((workdir / JOIN_PID).read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    # A zombie has exited; a reused pid runs something else.
    state = stat.rsplit(")", 1)[1].split()[0]
    if state == "Z" or str(workdir).encode() not in cmdline:
        return None
    return pid


def start_join(
    site_agent: str,
    workdir: Path,
    coordinator: str,
    token: str,
    enrol_address: str = "",
    image_root: str = "",
    base_model: str = "",
) -> int:
    """Starts ``site-agent join`` in its own session (it outlives this process and the
    SuperNode); output goes to ``WORKDIR/flower-join.log``. Returns its pid."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [site_agent, "join", "--workdir", str(workdir), "--coordinator", coordinator]
    if token:
        argv += ["--token", token]
    if enrol_address:
        argv += ["--enrol-address", enrol_address]
    if image_root:
        argv += ["--image-root", image_root]
    if base_model:
        argv += ["--base-model", base_model]
    with (workdir / JOIN_LOG).open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    (workdir / JOIN_PID).write_text(str(process.pid))
    return process.pid
