"""Audit log: receipts, signed checkpoints, consistency, and offline checks of an export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from protocol.audit_export import export_lines, verify_log_file
from protocol.audit_log import (
    AuditEvent,
    AuditLog,
    Checkpoint,
    Receipt,
    verify_checkpoint,
    verify_consistency_proof,
    verify_receipt,
)
from protocol.canonical import canonical_json
from protocol.errors import InvalidArgument, VerificationFailed

LOG_ID = "spiffe://test/coordinator"
KINDS = ["enrolled", "assigned", "upload_begun", "accepted", "rejected", "revoked"]


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _events(count: int) -> list[AuditEvent]:
    return [
        AuditEvent(
            kind=KINDS[i % len(KINDS)],
            at=f"2026-01-01T00:00:{i % 60:02d}.000000Z",
            details={"site": f"site-{i % 3}", "expert": i % 4, "n": i},
        )
        for i in range(count)
    ]


def _stamp(i: int) -> str:
    return f"2026-01-02T00:00:{i:02d}.000000Z"


def _log_with_checkpoints(
    key: ec.EllipticCurvePrivateKey, events: list[AuditEvent], at_sizes: list[int]
) -> tuple[AuditLog, list[Checkpoint]]:
    log, checkpoints = AuditLog(LOG_ID), list[Checkpoint]()
    for event in events:
        log.append(event)
        if log.size in at_sizes:
            checkpoints.append(log.checkpoint(key, at=_stamp(len(checkpoints))))
    return log, checkpoints


def _write(path: Path, events: list[AuditEvent], checkpoints: list[Checkpoint]) -> Path:
    path.write_bytes(b"".join(export_lines(events, checkpoints)))
    return path


def test_events_are_canonical_json_leaves() -> None:
    event = AuditEvent(kind="accepted", at="2026-01-01T00:00:00Z", details={"z": 1, "a": [2.5]})
    assert (
        event.canonical()
        == b'{"at":"2026-01-01T00:00:00Z","details":{"a":[2.5],"z":1},"kind":"accepted"}'
    )
    assert AuditEvent.from_json(json.loads(event.canonical())) == event
    with pytest.raises(InvalidArgument, match="audit event kind 'deleted'"):
        AuditEvent.new("deleted")
    with pytest.raises(InvalidArgument, match="expected keys"):
        AuditEvent.from_json({"kind": "accepted"})


def test_receipts_verify_offline(key: ec.EllipticCurvePrivateKey) -> None:
    events = _events(11)
    log, _ = _log_with_checkpoints(key, events, [])
    checkpoint = log.checkpoint(key)
    for index, event in enumerate(events):
        receipt = log.receipt(event, index, checkpoint)
        round_tripped = Receipt.from_json(json.loads(canonical_json(receipt.to_json())))
        assert round_tripped == receipt
        verify_receipt(round_tripped, key.public_key())

    receipt = log.receipt(events[3], 3, checkpoint)
    other = AuditEvent(kind="accepted", at=events[3].at, details={"expert": 99})
    with pytest.raises(VerificationFailed, match="receipt for accepted event 3"):
        verify_receipt(Receipt(other, 3, receipt.inclusion_proof, checkpoint), key.public_key())
    with pytest.raises(VerificationFailed, match="expected the coordinator key"):
        verify_receipt(receipt, ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(InvalidArgument, match="holds another event"):
        log.receipt(events[4], 3, checkpoint)


def test_checkpoint_signature_covers_size_root_and_time(key: ec.EllipticCurvePrivateKey) -> None:
    log, _ = _log_with_checkpoints(key, _events(5), [])
    checkpoint = log.checkpoint(key)
    verify_checkpoint(checkpoint, key.public_key(), log_id=LOG_ID)
    for change in ({"tree_size": 4}, {"root_hash": log.root(4).hex()}, {"timestamp": _stamp(9)}):
        forged = Checkpoint(**{**checkpoint.to_json(), **change})
        with pytest.raises(VerificationFailed, match="signature check failed"):
            verify_checkpoint(forged, key.public_key())
    with pytest.raises(VerificationFailed, match="log id check"):
        verify_checkpoint(checkpoint, key.public_key(), log_id="spiffe://other/coordinator")


def test_consistency_between_checkpoints(key: ec.EllipticCurvePrivateKey) -> None:
    events = _events(20)
    log, (old, new) = _log_with_checkpoints(key, events, [7, 20])
    verify_consistency_proof(old, new, log.consistency_proof(7, 20), key.public_key())

    # A log rewritten after the first checkpoint cannot prove consistency with it.
    rewritten, _ = _log_with_checkpoints(key, [events[1], events[0], *events[2:]], [])
    forged_new = rewritten.checkpoint(key, at=_stamp(5))
    with pytest.raises(VerificationFailed, match="consistency proof"):
        verify_consistency_proof(old, forged_new, rewritten.consistency_proof(7), key.public_key())
    with pytest.raises(VerificationFailed, match="truncated"):
        verify_consistency_proof(new, old, [], key.public_key())


def test_restart_from_stored_leaf_hashes(key: ec.EllipticCurvePrivateKey) -> None:
    events = _events(9)
    log = AuditLog(LOG_ID)
    stored = [log.append(event) for event in events]
    assert [s.index for s in stored] == list(range(9))
    checkpoint = log.checkpoint(key)
    restored = AuditLog(LOG_ID, leaf_hashes=[s.leaf_hash for s in stored])
    restored.check_checkpoint(checkpoint)
    assert restored.root() == log.root()

    lost_one = AuditLog(LOG_ID, leaf_hashes=[s.leaf_hash for s in stored[:-1]])
    with pytest.raises(VerificationFailed, match="truncated"):
        lost_one.check_checkpoint(checkpoint)
    swapped = [s.leaf_hash for s in stored]
    swapped[2], swapped[5] = swapped[5], swapped[2]
    with pytest.raises(VerificationFailed, match="reordered"):
        AuditLog(LOG_ID, leaf_hashes=swapped).check_checkpoint(checkpoint)


def test_export_verifies(key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    events = _events(30)
    log, checkpoints = _log_with_checkpoints(key, events, [1, 10, 30])
    path = _write(tmp_path / "audit.jsonl", events, checkpoints)
    result = verify_log_file(path, key.public_key(), log_id=LOG_ID)
    assert result.tree_size == 30
    assert result.root_hash == log.root().hex()
    assert result.events == tuple(events)
    assert [c.tree_size for c in result.checkpoints] == [1, 10, 30]


def test_truncated_export_is_detected(key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    events = _events(30)
    _, checkpoints = _log_with_checkpoints(key, events, [10, 30])
    # The tail is cut off together with the last embedded checkpoint; the auditor holds it.
    path = _write(tmp_path / "audit.jsonl", events[:25], checkpoints[:1])
    with pytest.raises(VerificationFailed, match=r"truncated \(events 25\.\.29 missing\)"):
        verify_log_file(path, key.public_key(), trusted=[checkpoints[1]])


def test_reordered_export_is_detected(key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    events = _events(30)
    _, checkpoints = _log_with_checkpoints(key, events, [10, 30])
    swapped = [*events[:12], events[13], events[12], *events[14:]]
    # Renumbered consistently: only the signed root can tell.
    path = _write(tmp_path / "renumbered.jsonl", swapped, checkpoints)
    with pytest.raises(VerificationFailed, match=r"first 30 events hash to root .* reordered"):
        verify_log_file(path, key.public_key())
    # Lines moved as they were: the index says where.
    lines = _write(tmp_path / "in-order.jsonl", events, checkpoints).read_bytes().splitlines(True)
    lines[13], lines[14] = lines[14], lines[13]  # line 0..10 = events 0..9 + checkpoint
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(b"".join(lines))
    with pytest.raises(VerificationFailed, match="line 14: expected event index 12, got 13"):
        verify_log_file(moved, key.public_key())


def test_altered_or_foreign_export_is_detected(
    key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    events = _events(12)
    _, checkpoints = _log_with_checkpoints(key, events, [12])
    altered = [*events[:4], AuditEvent("accepted", events[4].at, {"site": "evil"}), *events[5:]]
    path = _write(tmp_path / "altered.jsonl", altered, checkpoints)
    with pytest.raises(VerificationFailed, match="altered, removed or reordered"):
        verify_log_file(path, key.public_key())

    path = _write(tmp_path / "ok.jsonl", events, checkpoints)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(VerificationFailed, match="line 13: checkpoint at size 12: signed by keyid"):
        verify_log_file(path, other)

    (tmp_path / "garbage.jsonl").write_bytes(b'{"type": "event", "index": 0}\nnot json\n')
    with pytest.raises(VerificationFailed, match="line 1: audit event: expected keys"):
        verify_log_file(tmp_path / "garbage.jsonl", key.public_key())
