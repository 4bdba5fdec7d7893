"""`site-agent`: what a site operator runs at a university lab."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from protocol.assignment import load_site_assignment
from protocol.cli_support import parse_duration, run_parser
from protocol.client import FederationClient
from protocol.errors import FailedPrecondition, Interrupted, InvalidArgument
from protocol.messages import PHASES
from protocol.retry import Retry
from protocol.x509 import load_certificate
from site_agent.agent import RESUMABLE, Agent, connect, enrol, require_enrolled
from site_agent.launch import LaunchSettings, SlurmSettings, local_processes, parse_gpus
from site_agent.workdir import Workdir

log = logging.getLogger("atoll.site")
# An enrolled site rides out a coordinator down for a long weekend; first contact does not.
GIVE_UP = "3d"
FIRST_CONTACT_GIVE_UP = "1m"


def cmd_join(args: argparse.Namespace) -> int:
    workdir = Workdir(Path(args.workdir))
    launch = _launch(args)  # bad launch flags fail before enrolling or downloading anything
    stop = threading.Event()
    _on_signal(stop.set)  # from here on: enrolment's waits end at once too
    log.info("[site] joining from %s (SIGTERM/SIGINT stop at once)", workdir.root)
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
        first_contact = Retry(give_up_after=parse_duration(args.first_contact_give_up), stop=stop)
        enrol(workdir, args.coordinator, args.token, args.enrol_address, first_contact)
    retry = Retry(give_up_after=parse_duration(args.give_up), stop=stop)
    with connect(workdir, args.coordinator, retry) as client:
        agent = _agent(args, workdir, client)
        if stop.is_set():
            raise Interrupted("stopped by a signal")
        agent.launch = launch
        return agent.run(until=args.until)


def _on_signal(handler: Callable[[], None]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: handler())


def _agent(args: argparse.Namespace, workdir: Workdir, client: FederationClient | None) -> Agent:
    agent = Agent(
        workdir,
        client,
        progress=sys.stderr.isatty(),
        image_root=Path(args.image_root) if getattr(args, "image_root", None) else None,
        base_model=Path(args.base_model) if getattr(args, "base_model", None) else None,
    )
    _on_signal(agent.interrupt)
    return agent


def _launch(args: argparse.Namespace) -> LaunchSettings:
    """The launch flags, checked against this machine (GPUs) or the cluster (Slurm tools,
    shared workdir)."""
    slurm = SlurmSettings(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        time=args.time,
        account=args.account,
        extra_args=tuple(args.slurm_arg),
        template=Path(args.slurm_template) if args.slurm_template else None,
    )
    if args.launcher == "local" and (args.nodes != 1 or args.gpus_per_node is not None):
        raise InvalidArgument(
            "--nodes and --gpus-per-node are for --launcher slurm; on this machine use --gpus N"
        )
    launch = LaunchSettings(
        gpus=parse_gpus(args.gpus) if args.gpus is not None else None,
        procs=args.procs,
        launcher=args.launcher,
        slurm=slurm,
    )
    if launch.launcher == "local":
        local_processes(launch)
    else:
        from site_agent.slurm import check_shared_workdir, check_slurm, check_template

        check_template(slurm.template)
        check_slurm()
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        check_shared_workdir(Path(args.workdir), slurm.nodes)
    return launch


def cmd_train(args: argparse.Namespace) -> int:
    """An offline site: verify the assignment's files, train, sign; `upload` sends it later."""
    workdir = Workdir(Path(args.workdir))
    require_enrolled(workdir)
    launch = _launch(args)
    if args.assignment:
        given = load_site_assignment(Path(args.assignment))
        saved = workdir.assignment()
        if saved is not None and saved.assignment_digest != given.assignment_digest:
            raise FailedPrecondition(
                f"{workdir.root} holds assignment {saved.assignment_digest[:16]}.., not "
                f"{given.assignment_digest[:16]}.. from {args.assignment}: use another --workdir"
            )
        workdir.save_assignment(given)
    if workdir.assignment() is None:
        raise FailedPrecondition(f"{workdir.root} has no assignment: pass --assignment FILE")
    agent = _agent(args, workdir, None)
    agent.launch = launch
    saved_phase = workdir.agent_state().get("phase")
    agent.phase = saved_phase if saved_phase in RESUMABLE else "ready"
    if agent.phase != "done":
        agent.step()
    print(f"phase: {agent.phase} ({agent.message})")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    """Sends a trained, signed expert (after `site-agent train`): same path as `join`."""
    workdir = Workdir(Path(args.workdir))
    require_enrolled(workdir)
    phase = workdir.agent_state().get("phase")
    if phase not in ("uploading", "done"):
        raise FailedPrecondition(
            f"{workdir.root} is in phase {phase!r}: nothing signed to upload yet "
            "(run `site-agent train` first)"
        )
    with connect(workdir, args.coordinator) as client:
        agent = _agent(args, workdir, client)
        agent.phase = phase
        if phase != "done":
            agent.step()
    print(f"phase: {agent.phase} ({agent.message})")
    return 0 if agent.phase == "done" else 1


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
        "expert_index": None if assignment is None else assignment.expert_index,
        "assignment_digest": None if assignment is None else assignment.assignment_digest,
        "phase": agent.get("phase", "enrolled"),
        "message": agent.get("message", ""),
        "step": agent.get("step", 0),
        "total_steps": agent.get("total_steps", 0),
        "last_heartbeat": agent.get("last_heartbeat"),
        "accepted": _accepted(agent.get("receipt")),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key == "last_heartbeat" and value is not None:
            value = f"{time.time() - value:.0f}s ago"
        print(f"{key:>20}: {value}")
    return 0


def _accepted(receipt_json: str | None) -> dict[str, object] | None:
    """What the coordinator's receipt says was accepted (None before acceptance)."""
    if not receipt_json:
        return None
    receipt = json.loads(receipt_json)
    details = receipt["event"]["details"]
    provenance = details.get("provenance") or {}
    return {
        "expert": details.get("expert"),
        "upload_id": details.get("upload_id"),
        "log_index": receipt["index"],
        "model_root_digest": provenance.get("model_root_digest"),
    }


def _training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-root",
        help="this site's copy of the data set's images, if any (images of the shard it "
        "lacks are fetched from the coordinator into WORKDIR/images)",
    )
    parser.add_argument(
        "--base-model", help="local base checkpoint, when the coordinator does not serve it"
    )
    launch = parser.add_argument_group("ranks (torchrun)")
    launch.add_argument(
        "--gpus", metavar="N|all", help="ranks on this machine, one per GPU (default: all visible)"
    )
    launch.add_argument(
        "--procs", type=int, metavar="N", help="N CPU processes (gloo) instead of one per GPU"
    )
    launch.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="train on this machine (default) or submit a Slurm job from this login node",
    )
    slurm = parser.add_argument_group("Slurm (--launcher slurm)")
    slurm.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes of the job")
    slurm.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs (ranks) per node")
    slurm.add_argument("--partition", metavar="P")
    slurm.add_argument("--time", metavar="HH:MM:SS", help="time limit (resubmitted after it)")
    slurm.add_argument("--account", metavar="A")
    slurm.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="a further sbatch option, e.g. --slurm-arg=--qos=high (repeatable)",
    )
    slurm.add_argument(
        "--slurm-template", metavar="FILE", help="batch script (default deploy/slurm/...)"
    )


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
    p.add_argument(
        "--give-up",
        default=GIVE_UP,
        help=f"an enrolled site stops retrying a call after this long (default {GIVE_UP})",
    )
    p.add_argument(
        "--first-contact-give-up",
        default=FIRST_CONTACT_GIVE_UP,
        help="enrolment stops retrying after this long "
        f"(default {FIRST_CONTACT_GIVE_UP}: a wrong address should not wait for days)",
    )
    _training_flags(p)
    p.set_defaults(fn=cmd_join)

    p = commands.add_parser("train", help="offline: train and sign the assigned expert")
    p.add_argument("--workdir", required=True)
    p.add_argument("--assignment", help="assignment.json (default: the workdir's own)")
    _training_flags(p)
    p.set_defaults(fn=cmd_train)

    p = commands.add_parser("upload", help="upload the expert `train` signed")
    p.add_argument("--workdir", required=True)
    p.add_argument("--coordinator", help="HOST:PORT (default: the enrolled one)")
    p.set_defaults(fn=cmd_upload)

    p = commands.add_parser("status", help="this site's identity, assignment and phase")
    p.add_argument("--workdir", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
