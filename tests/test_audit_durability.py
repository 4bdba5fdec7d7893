"""The audit log against an operator with write access to store.db: a truncated log still
verifies locally, but not against a receipt a site kept; a damaged store is a failed
verification with the reason, never a traceback. Invitations, recipes and plans are logged."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.cli import main as coordinator_main
from ensemble.cli import main as atoll_main
from protocol.exit_codes import ExitCode

sys.path.insert(0, str(Path(__file__).parent))
from test_audit import Federation, signed_expert, upload
from test_audit import fed as fed  # the fixture


def _tamper(store_path: Path, *statements: str) -> None:
    conn = sqlite3.connect(store_path)
    for trigger in ("events_no_update", "events_no_delete", "checkpoints_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS audit_{trigger}")
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def test_a_truncated_store_is_caught_by_atoll_audit_against_a_kept_receipt(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = fed.running.state
    alpha = upload(fed.alpha, signed_expert(tmp_path / "e0", fed.alpha))
    assert alpha.accepted and upload(fed.beta, signed_expert(tmp_path / "e1", fed.beta)).accepted
    receipt_file = tmp_path / "alpha-receipt.json"
    receipt_file.write_text(alpha.receipt_json)
    index = json.loads(alpha.receipt_json)["index"]
    # Delete alpha's acceptance and everything after it, with the checkpoints covering them.
    _tamper(
        state.store_path,
        f"DELETE FROM audit_events WHERE idx >= {index}",
        f"DELETE FROM audit_checkpoints WHERE tree_size > {index}",
        "DELETE FROM uploads WHERE site IN ('alpha', 'beta')",
    )
    export = tmp_path / "audit.jsonl"
    root = str(state.root)
    # Locally the shorter log is self-consistent: nothing in the store remembers more.
    assert coordinator_main(["audit", "--state", root, "--export", str(export)]) == 0
    capsys.readouterr()
    pub = str(state.signing_pub)
    code = atoll_main(["audit", str(export), "--key", pub, "--against", str(receipt_file)])
    assert code == ExitCode.VERIFY_FAILED
    assert "the log is truncated" in capsys.readouterr().err
    # The site's agent state file works as well as the bare receipt.
    agent_state = tmp_path / "agent.json"
    agent_state.write_text(json.dumps({"phase": "done", "receipt": alpha.receipt_json}))
    assert atoll_main(["audit", str(export), "--key", pub, "--against", str(agent_state)]) == 8


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("UPDATE audit_events SET leaf_hash = 'not bytes' WHERE idx = 0", "could not be read"),
        ("UPDATE audit_checkpoints SET checkpoint_json = '{oops' WHERE seq = 1", "could not be"),
        ("UPDATE audit_events SET canonical = 7 WHERE idx = 1", "audit event 1"),
    ],
)
def test_a_damaged_store_is_a_failed_verification_not_a_traceback(
    fed: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    reason: str,
) -> None:
    assert upload(fed.alpha, signed_expert(tmp_path / "e0", fed.alpha)).accepted
    _tamper(fed.running.state.store_path, "DROP TRIGGER IF EXISTS audit_checkpoints_no_update")
    _tamper(fed.running.state.store_path, damage)
    root = str(fed.running.state.root)
    assert coordinator_main(["audit", "--state", root, "--json"]) == ExitCode.VERIFY_FAILED
    report = json.loads(capsys.readouterr().out)
    assert report["log"]["verified"] is False and reason in report["log"]["error"]
    export = tmp_path / "never.jsonl"
    code = coordinator_main(["audit", "--state", root, "--export", str(export)])
    assert code == ExitCode.VERIFY_FAILED and not export.exists()


def test_a_store_that_is_not_a_database_fails_verification(
    running: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    running.coordinator.store.close()
    running.state.store_path.write_bytes(b"this is not SQLite" * 100)
    root = str(running.state.root)
    assert coordinator_main(["audit", "--state", root]) == ExitCode.VERIFY_FAILED
    assert "the store cannot be opened" in capsys.readouterr().err


def test_invitations_recipes_and_plans_are_logged(running: Any) -> None:
    from coordinator import audit
    from coordinator.store import PlanRecord

    store = running.coordinator.store
    running.invite("alpha")
    store.put_plan(PlanRecord("cd" * 32, 2, 0.0), audit=audit.plan_set_event)
    store.put_plan(PlanRecord("cd" * 32, 2, 0.0), audit=audit.plan_set_event)  # unchanged
    description = json.dumps({"name": "r", "sha256": "ab" * 32, "base_model": {"digest": "x"}})
    store.set_meta("recipe", description, audit=audit.recipe_set_event)
    store.set_meta("recipe", description, audit=audit.recipe_set_event)  # unchanged
    events = [r.event() for r in store.audit_events()]
    assert [e.kind for e in events] == ["invited", "plan_set", "recipe_set"]
    assert events[0].details["site"] == "alpha" and "secret" not in json.dumps(events[0].details)
    assert events[1].details == {"plan_digest": "cd" * 32, "num_experts": 2}
    assert events[2].details["recipe_sha256"] == "ab" * 32


def test_the_export_comes_with_a_c2sp_signed_checkpoint_note(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from protocol.checkpoint_note import open_note

    state = fed.running.state
    assert upload(fed.alpha, signed_expert(tmp_path / "e0", fed.alpha)).accepted
    export = tmp_path / "audit.jsonl"
    assert coordinator_main(["audit", "--state", str(state.root), "--export", str(export)]) == 0
    note = Path(f"{export}.note").read_text()
    origin, size, root, blank, signature, end = note.split("\n")
    assert origin == "testfed/coordinator" and blank == "" and end == ""
    assert signature.startswith("\u2014 testfed/coordinator ")
    key = fed.coordinator_key()
    assert open_note(note, key, "spiffe://testfed/coordinator")[0] == int(size)
    pub = str(state.signing_pub)
    assert atoll_main(["audit", str(export), "--key", pub, "--against", f"{export}.note"]) == 0
    # The log cut short of the note's head, or a note with a changed root, fails.
    lines = export.read_text().splitlines(keepends=True)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(lines[:2]))
    capsys.readouterr()
    assert atoll_main(["audit", str(short), "--key", pub, "--against", f"{export}.note"]) == 8
    assert "the log is truncated" in capsys.readouterr().err
    forged = tmp_path / "forged.note"
    forged.write_text(note.replace(root, "A" * 43 + "="))
    assert atoll_main(["audit", str(export), "--key", pub, "--against", str(forged)]) == 8
    assert "signature check failed" in capsys.readouterr().err
