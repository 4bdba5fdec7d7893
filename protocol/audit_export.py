"""The audit log's export: JSON lines anyone can verify offline with the coordinator's
public key (:func:`verify_log_file`; `atoll audit`).

Format (UTF-8): one line per event in index order,
``{"type": "event", "index": i, "event": {...}}``, with checkpoint lines
``{"type": "checkpoint", "checkpoint": {...}}`` placed right after the event that brings the
log to the checkpoint's size (see :func:`export_lines`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from protocol.audit_log import (
    AuditEvent,
    AuditLog,
    Checkpoint,
    checkpoint_time,
    verify_checkpoint,
)
from protocol.canonical import canonical_json
from protocol.errors import InvalidArgument, VerificationFailed

__all__ = ["LogVerification", "export_lines", "verify_log_file"]


def export_lines(
    events: Iterable[AuditEvent], checkpoints: Iterable[Checkpoint]
) -> Iterator[bytes]:
    """The export file, line by line (each ending in a newline).

    Args:
        events: All events in index order.
        checkpoints: Checkpoints to embed, any order; each follows the event that brings
            the log to its size (size-0 checkpoints come first).
    """
    by_size: dict[int, list[Checkpoint]] = {}
    for checkpoint in checkpoints:
        by_size.setdefault(checkpoint.tree_size, []).append(checkpoint)

    def checkpoint_lines(size: int) -> Iterator[bytes]:
        for checkpoint in sorted(by_size.pop(size, []), key=checkpoint_time):
            yield canonical_json({"type": "checkpoint", "checkpoint": checkpoint.to_json()}) + b"\n"

    count = 0
    yield from checkpoint_lines(0)
    for event in events:
        yield canonical_json({"type": "event", "index": count, "event": event.to_json()}) + b"\n"
        count += 1
        yield from checkpoint_lines(count)
    if by_size:
        raise InvalidArgument(
            f"export: checkpoints at sizes {sorted(by_size)} exceed the {count} events"
        )


@dataclass(frozen=True)
class LogVerification:
    """The outcome of :func:`verify_log_file`.

    Attributes:
        tree_size: Events in the file.
        root_hash: Hex root over all of them.
        checkpoints: Every checkpoint verified (embedded and trusted), by size.
        events: The events, in index order.
    """

    tree_size: int
    root_hash: str
    checkpoints: tuple[Checkpoint, ...]
    events: tuple[AuditEvent, ...]


def verify_log_file(
    path: Path,
    public_key: ec.EllipticCurvePublicKey,
    trusted: Sequence[Checkpoint] = (),
    log_id: str | None = None,
) -> LogVerification:
    """Verifies an exported audit log offline.

    Rebuilds the tree from the event lines and checks every checkpoint, embedded or
    ``trusted`` (e.g. one from a receipt, or kept from an earlier audit): its signature under
    ``public_key``, and that the events give its root at its size. A log shorter than a
    checkpoint is *truncated*; a root mismatch means events were altered or *reordered*.
    Checkpoints must grow in size and time.

    Args:
        path: The JSON-lines export.
        public_key: The coordinator's public key.
        trusted: Checkpoints obtained out of band, which the file must agree with.
        log_id: When given, the log every checkpoint must name.

    Returns:
        Size, root, checkpoints and events of the verified log.

    Raises:
        VerificationFailed: Naming the line and the check that failed.
    """
    log = AuditLog(log_id or "")
    events: list[AuditEvent] = []
    checkpoints: list[tuple[str, Checkpoint]] = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
                kind = record["type"]
            except (ValueError, KeyError, TypeError) as error:
                raise VerificationFailed(f"{where}: not an audit log record ({error})") from error
            if kind == "event":
                if record.get("index") != log.size:
                    raise VerificationFailed(
                        f"{where}: expected event index {log.size}, got {record.get('index')}: "
                        "events are missing or reordered"
                    )
                try:
                    event = AuditEvent.from_json(record.get("event"))
                except InvalidArgument as error:
                    raise VerificationFailed(f"{where}: {error}") from error
                log.append(event)
                events.append(event)
            elif kind == "checkpoint":
                checkpoint = Checkpoint.from_json(record.get("checkpoint"))
                if checkpoint.tree_size != log.size:
                    raise VerificationFailed(
                        f"{where}: checkpoint of size {checkpoint.tree_size} follows event "
                        f"{log.size - 1}; expected it after event {checkpoint.tree_size - 1}"
                    )
                checkpoints.append((where, checkpoint))
            else:
                raise VerificationFailed(f"{where}: unknown record type {kind!r}")
    checkpoints += [(f"{path.name}: trusted checkpoint", c) for c in trusted]
    checkpoints.sort(key=lambda item: (item[1].tree_size, checkpoint_time(item[1])))
    previous: Checkpoint | None = None
    for where, checkpoint in checkpoints:
        try:
            verify_checkpoint(checkpoint, public_key, log_id=log_id)
        except VerificationFailed as error:
            raise VerificationFailed(f"{where}: {error}") from error
        log.check_checkpoint(checkpoint, where)
        if previous is not None and checkpoint_time(checkpoint) < checkpoint_time(previous):
            raise VerificationFailed(
                f"{where}: checkpoint at size {checkpoint.tree_size} is dated "
                f"{checkpoint.timestamp}, before the one at size {previous.tree_size} "
                f"({previous.timestamp})"
            )
        previous = checkpoint
    return LogVerification(
        tree_size=log.size,
        root_hash=log.root().hex(),
        checkpoints=tuple(c for _, c in checkpoints),
        events=tuple(events),
    )
