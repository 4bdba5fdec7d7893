"""`coordinator assemble`: build, sign and publish the routed ensemble."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.report_cli import short_digest
from coordinator.state import StateDir
from protocol.cli_support import Commands


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
    state = StateDir(Path(args.state))
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
            str(expert.index), expert.site, short_digest(expert.model_root_digest), expert.upload_id
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


def add_commands(commands: Commands) -> None:
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
