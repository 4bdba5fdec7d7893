"""`site-agent`: what a site operator runs at a university lab."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from protocol.cli_support import run_command, setup_logging
from protocol.messages import PHASES
from protocol.x509 import load_certificate
from site_agent.agent import Agent, connect, enrol
from site_agent.workdir import Workdir

log = logging.getLogger("atoll.site")


def cmd_join(args: argparse.Namespace) -> int:
    workdir = Workdir(Path(args.workdir))
    if workdir.is_enrolled():
        if args.token:
            log.info("[site] %s is already enrolled; ignoring --token", workdir.root)
    else:
        if not args.token:
            print("error: this workdir is not enrolled yet: pass --token", file=sys.stderr)
            return 2
        if not args.coordinator:
            print("error: pass --coordinator HOST:PORT to enrol", file=sys.stderr)
            return 2
        enrol(workdir, args.coordinator, args.token, args.enrol_address)
    with connect(workdir, args.coordinator) as client:
        agent = Agent(workdir, client, progress=sys.stderr.isatty())
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: agent.stop.set())
        return agent.run(until=args.until)


def cmd_status(args: argparse.Namespace) -> int:
    workdir = Workdir(Path(args.workdir))
    identity = workdir.identity()
    cert = load_certificate(workdir.cert.read_bytes(), str(workdir.cert))
    assignment = workdir.assignment()
    agent = workdir.agent_state()
    report = {
        "site": identity.site,
        "federation": identity.federation,
        "spiffe_id": identity.spiffe_id,
        "coordinator": identity.coordinator,
        "certificate_expires": cert.not_valid_after_utc.isoformat(),
        "expert_index": None if assignment is None else assignment["expert_index"],
        "assignment_digest": None if assignment is None else assignment["assignment_digest"],
        "phase": agent.get("phase", "enrolled"),
        "message": agent.get("message", ""),
        "last_heartbeat": agent.get("last_heartbeat"),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key == "last_heartbeat" and value is not None:
            value = f"{time.time() - value:.0f}s ago"
        print(f"{key:>20}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="site-agent", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("join", help="enrol (once) and work for the federation")
    p.add_argument("--coordinator", help="HOST:PORT of the coordinator (default: the enrolled one)")
    p.add_argument("--token", help="enrolment token from `coordinator invite` (first run only)")
    p.add_argument(
        "--enrol-address", help="HOST:PORT for enrolment (default: --coordinator's port + 1)"
    )
    p.add_argument("--workdir", required=True, help="the site's working directory")
    p.add_argument("--until", choices=PHASES, help="exit 0 once this phase is reached")
    p.set_defaults(fn=cmd_join)

    p = commands.add_parser("status", help="this site's identity, assignment and phase")
    p.add_argument("--workdir", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: int(args.fn(args)))


if __name__ == "__main__":
    sys.exit(main())
