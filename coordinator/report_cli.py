"""`coordinator` commands that report on the federation: status, audit, uploads."""

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

from coordinator import audit, audit_report, sites
from coordinator.state import StateDir
from coordinator.status import status_document, upload_fields
from protocol.checkpoint_note import sign_note
from protocol.cli_support import Commands, parse_duration
from protocol.errors import VerificationFailed
from protocol.exit_codes import ExitCode


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _date(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d", time.gmtime(seconds))


def short_digest(digest: str) -> str:
    return digest[:12] if digest else "-"


def cmd_status(args: argparse.Namespace) -> int:
    state = StateDir(Path(args.state))
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


def cmd_audit(args: argparse.Namespace) -> int:
    state = StateDir(Path(args.state))
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
            short_digest(row.base_model_digest),
            short_digest(row.data_digest),
            short_digest(row.recipe_digest),
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

    state = StateDir(Path(args.state))
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


def add_commands(commands: Commands) -> None:
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
        "protocol.audit_export.verify_log_file checks offline)",
    )
    p.set_defaults(fn=cmd_audit)

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
