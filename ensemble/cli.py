"""`atoll`: the auditor's and consumer's command line."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

from protocol import PROTOCOL_VERSION
from protocol.cli_support import run_command, setup_logging


def cmd_version(args: argparse.Namespace) -> int:
    print(f"atoll {version('atoll')} (protocol {PROTOCOL_VERSION})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atoll", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("version", help="print the Atoll and protocol versions")
    p.set_defaults(fn=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: int(args.fn(args)))


if __name__ == "__main__":
    sys.exit(main())
