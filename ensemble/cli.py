"""`atoll`: the auditor's and consumer's command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ensemble import evaluate, generate_cli, serve_cli
from ensemble.verify import verify_ensemble
from protocol import PROTOCOL_VERSION
from protocol.audit_export import LogVerification, verify_log_file
from protocol.audit_log import AuditLog, Receipt, verify_receipt
from protocol.checkpoint_note import open_note
from protocol.cli_support import run_parser
from protocol.ensemble_manifest import MANIFEST_FILE
from protocol.errors import AtollError, InvalidArgument, NotFound, VerificationFailed
from protocol.provenance import VerifiedExpert, verify_expert
from protocol.signing import SIGNATURE_FILE


def cmd_version(args: argparse.Namespace) -> int:
    print(f"atoll {version('atoll')} (protocol {PROTOCOL_VERSION})")
    return 0


def expert_report(verified: VerifiedExpert) -> dict[str, Any]:
    """What `atoll verify` prints about a verified expert directory."""
    provenance = verified.provenance
    certificate = verified.model.signer_certificate
    return {
        "kind": "expert",
        "verified": True,
        "signer": {
            "spiffe_id": verified.model.signer_spiffe_id,
            "certificate_serial": f"{certificate.serial_number:x}",
            "subject": certificate.subject.rfc4514_string(),
        },
        "model_root_digest": verified.model.digests.root_sha256,
        "files": len(verified.model.digests.files),
        "provenance": {"builder_id": provenance.builder_id, **provenance.run.to_json()},
    }


def _verify_expert_dir(path: Path, trusted_ca_pem: bytes) -> dict[str, Any]:
    return expert_report(verify_expert(path, trusted_ca_pem=trusted_ca_pem))


# What `atoll verify` recognises, by the file that marks it (an ensemble directory also
# holds a model.sig, so it comes first).
VERIFIERS: list[tuple[str, Callable[[Path, bytes], dict[str, Any]]]] = [
    (MANIFEST_FILE, verify_ensemble),
    (SIGNATURE_FILE, _verify_expert_dir),
]


def verify_path(path: Path, trusted_ca_pem: bytes) -> dict[str, Any]:
    """Verifies an expert directory or an ensemble directory offline.

    Raises:
        VerificationFailed: Naming the check and file that failed.
        NotFound: ``path`` is not a directory Atoll signs.
    """
    if not path.is_dir():
        raise NotFound(f"{path}: not a directory")
    for marker, verifier in VERIFIERS:
        if (path / marker).exists():
            return {"path": str(path), **verifier(path, trusted_ca_pem)}
    markers = " or ".join(marker for marker, _ in VERIFIERS)
    raise NotFound(f"{path}: no {markers}; not a signed Atoll expert or ensemble directory")


def _print_ensemble_report(report: dict[str, Any]) -> None:
    router = report["router"]
    print(f"{report['path']}: verified ensemble ({report['files']} signed files)")
    print(f"  signed by       {report['signer']['spiffe_id']}")
    print(f"  model digest    {report['model_root_digest']}")
    print(f"  federation      {report['federation']} ({report['version']})")
    print(f"  plan            {report['plan_digest']}")
    print(f"  router          tau {router['tau']}, top-{router['top_k']}, {router['text_only']}")
    if report["missing_experts"]:
        print(f"  MISSING experts {report['missing_experts']} (assembled with --allow-partial)")
    for expert in report["expert_provenance"]:
        provenance = expert["provenance"]
        print(
            f"  expert {expert['index']:<8} {expert['site']}  model {expert['model_root_digest'][:16]}.."
            f"  base {provenance['base_model_digest'][:12]}..  data "
            f"{provenance['shard_manifest_digest'][:12]}..  recipe {provenance['recipe_digest'][:12]}.."
        )


def _print_report(report: dict[str, Any]) -> None:
    if report["kind"] == "ensemble":
        _print_ensemble_report(report)
        return
    provenance = report["provenance"]
    print(f"{report['path']}: verified {report['kind']} ({report['files']} signed files)")
    print(f"  signed by       {report['signer']['spiffe_id']}")
    print(f"  model digest    {report['model_root_digest']}")
    print(f"  expert          {provenance['expert_index']}")
    print(f"  base model      {provenance['base_model_digest']}")
    print(f"  data (shard)    {provenance['shard_manifest_digest']}")
    print(f"  recipe          {provenance['recipe_digest']}")
    print(f"  assignment      {provenance['assignment_digest']}")
    print(f"  trained         {provenance['started_on']} .. {provenance['finished_on']}")
    print(f"  steps, loss     {provenance['steps']}, {provenance['final_loss']}")
    print(f"  atoll           {provenance['atoll_version']}")


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    try:
        trusted = Path(args.trust).read_bytes()
    except OSError as error:
        raise InvalidArgument(f"--trust {args.trust}: cannot read it ({error})") from error
    try:
        report = verify_path(path, trusted)
    except AtollError as error:
        if args.json:
            print(json.dumps({"path": str(path), "verified": False, "error": str(error)}))
        raise
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _coordinator_key(path: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"--key {path}: not a PEM public key ({error})") from error
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidArgument(f"--key {path}: expected the coordinator's P-256 public key")
    return key


def _check_note(
    result: LogVerification, name: str, text: str, key: ec.EllipticCurvePublicKey
) -> None:
    """The log must extend the head a signed checkpoint note (C2SP) promised."""
    # The log id: its checkpoints name it; a log cut before any has only the note's origin
    # (which the coordinator's signature covers).
    origin = text.partition("\n")[0]
    log = AuditLog(result.checkpoints[0].log_id if result.checkpoints else f"spiffe://{origin}")
    size, root = open_note(text, key, log.log_id)
    if size > result.tree_size:
        raise VerificationFailed(
            f"{name}: the note signs {size} events, the log holds {result.tree_size}: "
            "the log is truncated"
        )
    for event in result.events[:size]:
        log.append(event)
    if log.root(size) != root:
        raise VerificationFailed(
            f"{name}: the log's first {size} events do not give the note's root: events were "
            "altered, removed or reordered"
        )


def cmd_audit(args: argparse.Namespace) -> int:
    key = _coordinator_key(args.key)
    receipts = []
    notes = []
    for name in args.receipt or []:
        try:
            raw = Path(name).read_bytes()
            if not raw.lstrip().startswith(b"{"):
                notes.append((name, raw.decode()))  # a C2SP signed checkpoint note
                continue
            document = json.loads(raw)
            # A site workdir's agent state keeps the receipt (as JSON text) under "receipt".
            if isinstance(document, dict) and isinstance(document.get("receipt"), str):
                document = json.loads(document["receipt"])
            receipts.append(Receipt.from_json(document))
        except (OSError, ValueError) as error:
            raise InvalidArgument(f"--receipt {name}: unreadable ({error})") from error
    try:
        for receipt in receipts:
            verify_receipt(receipt, key)
        # The receipts' checkpoints are trusted heads the log must agree with: a log cut
        # short of one of them is truncated.
        result = verify_log_file(Path(args.log), key, trusted=[r.checkpoint for r in receipts])
        for receipt in receipts:
            if result.events[receipt.index] != receipt.event:
                raise VerificationFailed(
                    f"{args.log}: event {receipt.index} is not the event of the receipt"
                )
        for name, text in notes:
            _check_note(result, name, text, key)
    except VerificationFailed as error:
        if args.json:
            print(json.dumps({"log": args.log, "verified": False, "error": str(error)}))
        raise
    report = {
        "log": args.log,
        "verified": True,
        "events": result.tree_size,
        "root_hash": result.root_hash,
        "checkpoints": len(result.checkpoints),
        "receipts": len(receipts),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{args.log}: verified {result.tree_size} events, root {result.root_hash[:16]}.., "
            f"{len(result.checkpoints)} checkpoint(s), {len(receipts)} receipt(s)"
        )
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ensemble.download import download_ensemble

    report = download_ensemble(
        args.coordinator,
        Path(args.out),
        token=args.token,
        workdir=Path(args.workdir) if args.workdir else None,
        enrol_address=args.enrol_address,
        progress=sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"downloaded and verified the ensemble in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atoll", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "generate", help="route an image + prompt through an ensemble and print the answer"
    )
    generate_cli.add_arguments(p)
    p.set_defaults(fn=generate_cli.run)

    p = commands.add_parser(
        "eval", help="score the ensemble (and a dense model) on a LLaVA-format benchmark file"
    )
    evaluate.add_arguments(p)
    p.set_defaults(fn=evaluate.run)

    p = commands.add_parser(
        "serve", help="serve the ensemble over an OpenAI-compatible chat-completions API"
    )
    serve_cli.add_arguments(p)
    p.set_defaults(fn=serve_cli.run)

    p = commands.add_parser("download", help="fetch the published ensemble and verify it")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--token", help="reader token (`coordinator invite --role reader`), first run")
    p.add_argument("--out", required=True, help="the ensemble directory to write")
    p.add_argument("--workdir", help="where the reader key lives (default: beside --out)")
    p.add_argument("--enrol-address", help="HOST:PORT for enrolment (default: PORT + 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_download)

    p = commands.add_parser("version", help="print the Atoll and protocol versions")
    p.set_defaults(fn=cmd_version)

    p = commands.add_parser(
        "verify",
        help="verify a signed expert or ensemble directory offline and print its provenance",
    )
    p.add_argument("path", help="the expert or ensemble directory")
    p.add_argument("--trust", required=True, help="the federation CA certificate (PEM)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_verify)

    p = commands.add_parser(
        "audit", help="verify an exported audit log (`coordinator audit --export`) offline"
    )
    p.add_argument("log", help="the JSON-lines export")
    p.add_argument("--key", required=True, help="the coordinator's public key (signing.pub)")
    p.add_argument(
        "--receipt",
        "--against",
        dest="receipt",
        action="append",
        help="a receipt a site kept (CommitUpload's, or a site workdir's agent state), or a "
        "signed checkpoint note: the log must hold its event and extend its checkpoint; "
        "repeatable",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
