"""`coordinator backup` and `coordinator restore`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coordinator.state import StateDir
from protocol.cli_support import Commands
from protocol.errors import InvalidArgument


def _passphrase(args: argparse.Namespace) -> bytes | None:
    if not args.passphrase_file:
        return None
    try:
        return Path(args.passphrase_file).read_bytes().strip()
    except OSError as error:
        raise InvalidArgument(f"--passphrase-file {args.passphrase_file}: {error}") from error


def cmd_backup(args: argparse.Namespace) -> int:
    from coordinator.backup import backup

    result = backup(StateDir(Path(args.state)), Path(args.out), _passphrase(args))
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


def add_commands(commands: Commands) -> None:
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
