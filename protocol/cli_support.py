"""What every Atoll command line shares: logging, durations, and error -> exit code."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from typing import TypeAlias

from rich.logging import RichHandler

from protocol.errors import AtollError, InvalidArgument
from protocol.exit_codes import ExitCode
from protocol.progress import quiet_library_bars

# What ``parser.add_subparsers()`` returns: a command group module adds its commands to it.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``24h``, ``7d`` -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise InvalidArgument(f"duration {text!r}: expected a number and s, m, h or d (e.g. 24h)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=None, show_path=False, markup=False)],
        force=True,
    )
    # Logs go to stderr so that stdout stays machine-readable (tokens, --json).
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RichHandler):
            handler.console.stderr = True
    quiet_library_bars()


def run_parser(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand (its ``fn`` default) as a command."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_command(lambda: int(args.fn(args)))


def run_command(fn: Callable[[], int]) -> int:
    """Runs a command body, turning domain errors into one clear line and an exit code."""
    try:
        return fn()
    except AtollError as error:
        print(f"error: {error}", file=sys.stderr)
        return int(error.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
