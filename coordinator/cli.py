"""`coordinator`: the federation operator's command line."""

from __future__ import annotations

import argparse
import sys

from coordinator import backup_cli, ensemble_cli, federation_cli, report_cli
from protocol.cli_support import run_parser


def build_parser() -> argparse.ArgumentParser:
    from coordinator.partition import cli as partition_cli
    from coordinator.partition import features_cli

    parser = argparse.ArgumentParser(prog="coordinator", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    federation_cli.add_commands(commands)

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

    report_cli.add_commands(commands)
    ensemble_cli.add_commands(commands)
    backup_cli.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
