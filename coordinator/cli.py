"""`coordinator`: the federation operator's command line."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator import audit, audit_report, enrolment, sites
from coordinator.certificates import DEFAULT_LIFETIME_DAYS
from coordinator.federation import init_federation, load_authority
from coordinator.federation_recipe import set_recipe
from coordinator.state import StateDir
from coordinator.status import status_document, upload_fields
from protocol.checkpoint_note import sign_note
from protocol.cli_support import parse_duration, run_parser
from protocol.errors import InvalidArgument, VerificationFailed
from protocol.exit_codes import ExitCode


def _state(args: argparse.Namespace) -> StateDir:
    return StateDir(Path(args.state))


def cmd_init(args: argparse.Namespace) -> int:
    state = init_federation(Path(args.state), args.federation, cert_days=args.cert_days)
    print(f"initialised federation {args.federation!r} in {state.root}", file=sys.stderr)
    print(f"CA certificate: {state.ca_cert}", file=sys.stderr)
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    state = _state(args)
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
    state = _state(args)
    store = state.open_store()
    try:
        base = Path(args.base_model) if args.base_model else None
        description = set_recipe(state, store, Path(args.recipe), base)
    finally:
        store.close()
    if args.json:
        print(json.dumps(description, indent=2))
    else:
        base_info = description["base_model"]
        where = "served to sites" if base_info["served"] else "sites bring their own copy"
        print(f"recipe {description['name']}: sha256 {description['sha256']}")
        print(f"base model: digest {base_info['digest']} ({base_info['files']} files, {where})")
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
        _state(args),
        args.listen,
        args.enrol_listen,
        heartbeat_seconds=args.heartbeat_seconds,
        operations=operations,
    )
    return 0


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _date(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d", time.gmtime(seconds))


def cmd_status(args: argparse.Namespace) -> int:
    state = _state(args)
    store = state.open_store()
    try:
        rows = sites.federation_status(store)
        plan = store.get_plan()
        document = status_document(state, store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    expiries = {row["site"]: row["certificate_expires_at"] for row in document["sites"]}
    title = f"federation {state.federation()}"
    title += f" — plan {plan.digest[:12]}, {plan.num_experts} experts" if plan else " — no plan yet"
    table = Table(title=title)
    for column in ("site", "expert", "phase", "step", "loss", "last heartbeat", "cert expires", ""):
        table.add_column(column)
    for row in rows:
        progress = f"{row.step}/{row.total_steps}" if row.total_steps else "-"
        flag = "REVOKED" if row.revoked else ("SILENT" if row.silent else "")
        table.add_row(
            row.site,
            "-" if row.expert is None else str(row.expert),
            row.phase,
            progress,
            f"{row.loss:.4f}" if row.total_steps else "-",
            _ago(row.seconds_since_heartbeat),
            _date(expiries.get(row.site)),
            flag,
        )
    console = Console()
    console.print(table)
    accepted = [e for e in document["experts"] if e["phase"] == "accepted"]
    certs = document["certificates"]
    console.print(
        f"experts accepted: {len(accepted)}/{len(document['experts'])}; CA expires "
        f"{_date(certs['ca_expires_at'])}, serving certificate {_date(certs['server_expires_at'])}"
        f", site certificates live {certs['lifetime_days']} days"
    )
    return 0


def _short(digest: str) -> str:
    return digest[:12] if digest else "-"


def cmd_audit(args: argparse.Namespace) -> int:
    state = _state(args)
    try:
        store = state.open_store()
    except sqlite3.DatabaseError as error:
        raise VerificationFailed(f"{state.root}: the store cannot be opened ({error})") from None
    try:
        auditor = audit.Auditor.open(state, store)
        report = audit_report.verify_store_log(store, auditor.log_id, auditor.public_key)
        rows = audit_report.provenance_table(store)
        if args.export and report.verified:
            # A fresh head first, so the export's last checkpoint covers every event (never
            # over a log that failed verification: that would sign the damage).
            checkpoints = store.list_checkpoints()
            if not checkpoints or checkpoints[-1].tree_size < store.audit_size():
                auditor.checkpoint()
            count = audit_report.export_log(store, Path(args.export))
            print(f"exported {count} events to {args.export}", file=sys.stderr)
            report = audit_report.verify_store_log(store, auditor.log_id, auditor.public_key)
            # The same head as a C2SP signed note, for transparency-log tools and auditors.
            note = sign_note(
                auditor.log_id, report.size, bytes.fromhex(report.root_hash), auditor.signing_key
            )
            Path(f"{args.export}.note").write_text(note)
        elif args.export:
            print(f"not exported to {args.export}: the log failed verification", file=sys.stderr)
    finally:
        store.close()
    code = int(ExitCode.OK if report.verified else ExitCode.VERIFY_FAILED)
    if args.json:
        payload = {
            "federation": state.federation(),
            "provenance": [row.as_json() for row in rows],
            "log": report.as_json(),
        }
        print(json.dumps(payload, indent=2))
        return code
    table = Table(title=f"federation {state.federation()} — accepted experts")
    for column in ("expert", "site", "base", "data", "recipe", "accepted at", "log index", ""):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row.expert),
            row.site,
            _short(row.base_model_digest),
            _short(row.data_digest),
            _short(row.recipe_digest),
            row.accepted_at,
            str(row.log_index),
            "SITE REVOKED" if row.site_revoked else "",
        )
    console = Console()
    console.print(table)
    signed = f"{report.checkpoints} signed checkpoint(s)"
    if report.unsigned_events:
        signed += f", {report.unsigned_events} event(s) after the latest"
    if report.verified:
        console.print(
            f"audit log {report.log_id}: {report.size} events, root {report.root_hash[:16]}.., "
            f"{signed}: verified"
        )
    else:
        console.print(f"audit log {report.log_id}: VERIFICATION FAILED: {report.error}")
    return code


def cmd_uploads(args: argparse.Namespace) -> int:
    """Upload sessions with their progress; ``--prune`` first deletes abandoned ones."""
    from coordinator import upload

    state = _state(args)
    store = state.open_store()
    try:
        deleted: list[str] = []
        if args.prune:
            quota = upload.UploadQuota(abandon_after=parse_duration(args.older_than))
            deleted = upload.prune(state, store, quota)
        now = time.time()
        rows: list[dict[str, Any]] = [
            {
                **upload_fields(u),
                "idle_seconds": round(now - upload.last_activity(state, u)),
                "files_on_disk": (state.uploads_dir / u.upload_id).exists(),
                "reason": u.reason,
            }
            for u in store.list_uploads()
        ]
    finally:
        store.close()
    if args.json:
        print(json.dumps({"deleted": deleted, "uploads": rows}, indent=2))
        return 0
    table = Table(title="upload sessions")
    for column in ("upload", "site", "expert", "state", "received", "idle", "on disk", "reason"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["upload_id"])[:12],
            str(row["site"]),
            str(row["expert"]),
            str(row["state"]),
            f"{row['received_bytes']}/{row['total_bytes']}",
            _ago(float(row["idle_seconds"])),
            "yes" if row["files_on_disk"] else "",
            str(row["reason"])[:60],
        )
    console = Console()
    console.print(table)
    if args.prune:
        console.print(f"deleted the files of {len(deleted)} session(s)")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    state = _state(args)
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


def cmd_assemble(args: argparse.Namespace) -> int:
    from coordinator.assembly import AssemblyConfig, assemble
    from protocol.ensemble_manifest import TextOnlyStrategy

    config = AssemblyConfig(
        tau=args.tau,
        top_k=args.top_k,
        text_only=TextOnlyStrategy(args.text_only),
        allow_partial=args.allow_partial,
        encoder_weights=Path(args.encoder_weights) if args.encoder_weights else None,
        fit_tau=Path(args.fit_tau) if args.fit_tau else None,
        fit_image_root=Path(args.fit_image_root) if args.fit_image_root else None,
    )
    state = _state(args)
    store = state.open_store()
    try:
        result = assemble(state, store, config)
    finally:
        store.close()
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
        return 0
    table = Table(title=f"ensemble {result.version}: {result.directory}")
    for column in ("expert", "site", "model root digest", "upload"):
        table.add_column(column)
    for expert in result.experts:
        table.add_row(
            str(expert.index), expert.site, _short(expert.model_root_digest), expert.upload_id
        )
    for index in result.missing:
        flag = "REVOKED SITE (dropped)" if index in result.dropped_revoked else "MISSING"
        table.add_row(str(index), flag, "-", "-")
    Console().print(table)
    if result.tau_fit is not None:
        _print_tau_fit(result.tau, result.tau_fit)
    print(
        f"published {result.files} files; manifest sha256 {result.manifest_sha256}",
        file=sys.stderr,
    )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    import grpc

    from coordinator.health import check
    from protocol.identity import coordinator_dns_name

    state = _state(args)
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


def _passphrase(args: argparse.Namespace) -> bytes | None:
    if not args.passphrase_file:
        return None
    try:
        return Path(args.passphrase_file).read_bytes().strip()
    except OSError as error:
        raise InvalidArgument(f"--passphrase-file {args.passphrase_file}: {error}") from error


def cmd_backup(args: argparse.Namespace) -> int:
    from coordinator.backup import backup

    result = backup(_state(args), Path(args.out), _passphrase(args))
    keys = "encrypted with the passphrase" if result.encrypted_keys else "NOT encrypted"
    print(
        f"backup {result.path}: {result.entries} entries, {result.bytes:,} bytes, "
        f"{result.audit_events} audit events, {result.open_uploads} open upload(s); "
        f"file mode 0600, private keys {keys}",
        file=sys.stderr,
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from coordinator.backup import restore

    manifest = restore(Path(args.from_file), Path(args.state), _passphrase(args))
    print(
        f"restored federation {manifest['federation']!r} into {args.state}: "
        f"{len(manifest['entries'])} entries verified, audit log verified "
        f"({manifest['audit_events']} events); start `coordinator serve --state {args.state}`",
        file=sys.stderr,
    )
    return 0


def _print_tau_fit(tau: float, fit: dict[str, Any]) -> None:
    table = Table(
        title=f"router tau fitted on {fit['data_file']} ({fit['samples']} questions): "
        "mean log-likelihood of the reference answers"
    )
    table.add_column("tau", justify="right")
    table.add_column("log-likelihood", justify="right")
    table.add_row(f"{tau:.4g} (fitted)", f"{fit['log_likelihood']:.4f}", style="bold")
    for value, likelihood in fit["compared"].items():
        table.add_row(value, f"{likelihood:.4f}")
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    from coordinator.partition import cli as partition_cli
    from coordinator.partition import features_cli

    parser = argparse.ArgumentParser(prog="coordinator", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

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

    p = commands.add_parser(
        "partition", help="cluster the dataset into K balanced shards: the partition plan"
    )
    partition_cli.add_arguments(p)
    p.set_defaults(fn=partition_cli.run)

    p = commands.add_parser(
        "features", help="CLIP features of a data set's images, for partition --features"
    )
    features_cli.add_arguments(p)
    p.set_defaults(fn=features_cli.run)

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

    p = commands.add_parser("status", help="sites, experts, progress, silent sites")
    p.add_argument("--state", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)

    p = commands.add_parser(
        "audit", help="the provenance of accepted experts and the audit log's verification"
    )
    p.add_argument("--state", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--export",
        metavar="FILE",
        help="also write the log as JSON lines, with a fresh signed checkpoint (what "
        "protocol.audit_log.verify_log_file checks offline)",
    )
    p.set_defaults(fn=cmd_audit)

    p = commands.add_parser(
        "assemble", help="build, sign and publish the routed ensemble from the accepted experts"
    )
    p.add_argument("--state", required=True)
    p.add_argument("--tau", type=float, default=50.0, help="router inverse temperature (> 0)")
    p.add_argument(
        "--fit-tau",
        metavar="DATA.json",
        help="fit tau instead: maximise the ensemble's log-likelihood of the reference answers "
        "of this held-out set (an `atoll eval` file); recorded and signed in the manifest",
    )
    p.add_argument(
        "--fit-image-root", metavar="DIR", help="images of --fit-tau (default: its folder)"
    )
    p.add_argument("--top-k", type=int, default=1, help="experts mixed per sample (default 1)")
    p.add_argument(
        "--text-only",
        default="posterior",
        choices=("uniform", "clip-text", "posterior"),
        help="routing of prompts without an image (default posterior)",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="assemble without missing experts and experts of revoked sites",
    )
    p.add_argument(
        "--encoder-weights",
        metavar="PATH",
        help="the plan's encoder weights file (open_clip) or CLIP folder (hf), when it is not "
        "where the plan's spec points",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_assemble)

    p = commands.add_parser(
        "backup", help="a consistent backup of the state directory, taken while serve runs"
    )
    p.add_argument("--state", required=True)
    p.add_argument("--out", required=True, metavar="FILE", help="backup file to create (0600)")
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="encrypt the private keys inside the backup with this passphrase",
    )
    p.set_defaults(fn=cmd_backup)

    p = commands.add_parser("restore", help="restore a backup into a new state directory")
    p.add_argument("--from", dest="from_file", required=True, metavar="FILE")
    p.add_argument("--state", required=True, help="a new or empty directory")
    p.add_argument("--passphrase-file", metavar="FILE", help="the backup's passphrase")
    p.set_defaults(fn=cmd_restore)

    p = commands.add_parser("uploads", help="upload sessions; --prune deletes abandoned ones")
    p.add_argument("--state", required=True)
    p.add_argument(
        "--prune",
        action="store_true",
        help="reject open sessions idle past --older-than and delete rejected sessions' files",
    )
    p.add_argument("--older-than", default="7d", help="what counts as abandoned (default 7d)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_uploads)

    p = commands.add_parser("revoke", help="refuse a site's certificate from now on")
    p.add_argument("--state", required=True)
    p.add_argument("site", help="the site's name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
