"""`coordinator` commands that set up and run the federation: init, invite, recipe, revoke,
serve, health."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from coordinator import audit, audit_report, enrolment, sites
from coordinator.certificates import DEFAULT_LIFETIME_DAYS
from coordinator.federation import init_federation, load_authority
from coordinator.federation_recipe import set_recipe
from coordinator.state import StateDir
from protocol.cli_support import Commands, parse_duration
from protocol.exit_codes import ExitCode


def cmd_init(args: argparse.Namespace) -> int:
    state = init_federation(Path(args.state), args.federation, cert_days=args.cert_days)
    print(f"initialised federation {args.federation!r} in {state.root}", file=sys.stderr)
    print(f"CA certificate: {state.ca_cert}", file=sys.stderr)
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    state = StateDir(Path(args.state))
    store = state.open_store()
    try:
        token = enrolment.invite(
            store, load_authority(state), args.site, parse_duration(args.ttl), role=args.role
        )
        record = store.get_token(token.token_id)
    finally:
        store.close()
    if args.json:
        # For programs that hand the token on (integrations/flower): the CA pin and expiry
        # as fields, so that nobody parses the token's text.
        payload = {
            "federation": state.federation(),
            "site": token.site,
            "role": args.role,
            "token": str(token),
            "token_id": token.token_id,
            "ca_sha256": token.ca_sha256,
            "expires_at": None if record is None else record.expires_at,
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(str(token))  # alone on stdout, so `TOKEN=$(coordinator invite ...)` works
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    state = StateDir(Path(args.state))
    store = state.open_store()
    try:
        base = Path(args.base_model) if args.base_model else None
        description = set_recipe(state, store, Path(args.recipe), base)
    finally:
        store.close()
    if args.json:
        print(json.dumps(description.to_json(), indent=2))
    else:
        base_info = description.base_model
        where = "served to sites" if base_info.served else "sites bring their own copy"
        print(f"recipe {description.name}: sha256 {description.sha256}")
        print(f"base model: digest {base_info.digest} ({base_info.files} files, {where})")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    state = StateDir(Path(args.state))
    store = state.open_store()
    try:
        site = store.revoke_site(args.site, time.time(), audit=audit.revoked_event)
        audit.Auditor.open(state, store).checkpoint()
        delivered = [row for row in audit_report.provenance_table(store) if row.site == site.name]
    finally:
        store.close()
    assert site.revoked_at is not None
    result = {
        "site": site.name,
        "spiffe_id": site.spiffe_id,
        "revoked_at": site.revoked_at,
        "flagged_experts": [row.as_json() for row in delivered],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"site {site.name} revoked: its certificate is refused from now on", file=sys.stderr)
    for row in delivered:
        print(
            f"flagged: expert {row.expert} (log index {row.log_index}) was delivered by "
            f"{site.name}",
            file=sys.stderr,
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from coordinator.operations import OperationsOptions
    from coordinator.server import serve  # grpc server imports only where needed

    operations = OperationsOptions(
        metrics_listen=args.metrics_listen,
        dashboard_listen=args.dashboard_listen,
        dashboard_token_file=Path(args.dashboard_token_file) if args.dashboard_token_file else None,
    )
    serve(
        StateDir(Path(args.state)),
        args.listen,
        args.enrol_listen,
        heartbeat_seconds=args.heartbeat_seconds,
        operations=operations,
    )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc

    from coordinator.health import check
    from protocol.identity import coordinator_dns_name

    state = StateDir(Path(args.state))
    override = [("grpc.ssl_target_name_override", coordinator_dns_name(state.federation()))]
    credentials = grpc.ssl_channel_credentials(state.ca_cert.read_bytes())
    with grpc.secure_channel(args.address, credentials, options=override) as channel:
        try:
            answer = check(channel, args.service, timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name} ({error.details()})", file=sys.stderr)
            return int(ExitCode.UNAVAILABLE)
    print(answer)
    return 0 if answer == "SERVING" else int(ExitCode.UNAVAILABLE)


def add_commands(commands: Commands) -> None:
    p = commands.add_parser("init", help="create a federation: CA, signing key, store")
    p.add_argument("--state", required=True, help="state directory to create")
    p.add_argument("--federation", required=True, help="federation name (a DNS label)")
    p.add_argument(
        "--cert-days",
        type=int,
        default=DEFAULT_LIFETIME_DAYS,
        help=f"lifetime of site and reader certificates (default {DEFAULT_LIFETIME_DAYS}); "
        "agents renew when a third is left",
    )
    p.set_defaults(fn=cmd_init)

    p = commands.add_parser("invite", help="print a one-time enrolment token for a site")
    p.add_argument("--state", required=True)
    p.add_argument("site", help="the site's name (a DNS label)")
    p.add_argument("--ttl", default="24h", help="how long the token stays valid (default 24h)")
    p.add_argument("--role", default="site", choices=enrolment.ROLES)
    p.add_argument("--json", action="store_true", help="the token, its CA pin and expiry as JSON")
    p.set_defaults(fn=cmd_invite)

    p = commands.add_parser("recipe", help="fix the training recipe and base checkpoint")
    p.add_argument("--state", required=True)
    p.add_argument("--recipe", required=True, help="recipe YAML (e.g. configs/tiny-cpu.yaml)")
    p.add_argument(
        "--base-model", help="local base checkpoint (recipes with model.base: pretrained)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_recipe)

    p = commands.add_parser("revoke", help="refuse a site's certificate from now on")
    p.add_argument("--state", required=True)
    p.add_argument("site", help="the site's name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_revoke)

    p = commands.add_parser("serve", help="serve the federation over gRPC + mutual TLS")
    p.add_argument("--state", required=True)
    p.add_argument("--listen", default="0.0.0.0:7443", help="HOST:PORT for mutual-TLS site calls")
    p.add_argument(
        "--enrol-listen", help="HOST:PORT for enrolment (server TLS only; default PORT+1)"
    )
    p.add_argument(
        "--heartbeat-seconds",
        type=int,
        default=sites.HEARTBEAT_SECONDS,
        help="interval sites are asked to heartbeat at",
    )
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    p.add_argument(
        "--dashboard-listen",
        metavar="HOST:PORT",
        help="serve the read-only dashboard here (PORT alone: loopback)",
    )
    p.add_argument(
        "--dashboard-token-file",
        metavar="FILE",
        help="token the dashboard requires (required on a non-loopback address)",
    )
    p.set_defaults(fn=cmd_serve)

    p = commands.add_parser(
        "health", help="ask a running coordinator's gRPC health service (exit 0 if SERVING)"
    )
    p.add_argument("--state", required=True, help="state directory (for the CA certificate)")
    p.add_argument("--address", default="127.0.0.1:7444", help="the enrolment port (default)")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(fn=cmd_health)
