"""The store contract (the docstrings of coordinator/store.py's Store), held on a store in a
file and on one in memory."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.state import open_store
from coordinator.store import (
    SCHEMA_VERSION,
    ArtifactRecord,
    EnsembleRecord,
    HeartbeatRecord,
    PlanRecord,
    SiteRecord,
    Store,
    TokenRecord,
    UploadRecord,
)
from protocol.audit_log import AuditEvent, AuditLog, Checkpoint
from protocol.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from protocol.merkle import leaf_hash
from protocol.messages import UploadFile


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'store.db'}"
    opened = open_store(url)
    yield opened
    opened.close()


def token(token_id: str = "0123456789ab", site: str = "a") -> TokenRecord:
    return TokenRecord(token_id, site, "f" * 64, "site", 0.0, 100.0)


def site(name: str = "a", serial: str = "1") -> SiteRecord:
    return SiteRecord(name, f"spiffe://t/site/{name}", serial, "PEM", 1.0)


def enrolled(store: Store, *names: str) -> None:
    for i, name in enumerate(names):
        token_id = f"{i:012x}"
        store.add_token(token(token_id, name))
        store.enroll_site(token_id, site(name), now=1.0)


def upload(upload_id: str = "u1", site_name: str = "a") -> UploadRecord:
    files = (UploadFile("model.safetensors", 10, "a" * 64), UploadFile("config.json", 3, "b" * 64))
    return UploadRecord(upload_id, site_name, 0, files, created_at=1.0)


class TestStoreContract:
    def test_schema_version_and_meta(self, store: Store) -> None:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.get_meta("federation") is None
        store.set_meta("federation", "x")
        store.set_meta("federation", "y")
        assert store.get_meta("federation") == "y"

    def test_token_is_single_use(self, store: Store) -> None:
        store.add_token(token())
        with pytest.raises(AlreadyExists):
            store.add_token(token())
        enrolled = store.enroll_site("0123456789ab", site(), now=5.0)
        assert enrolled.name == "a"
        assert store.get_token("0123456789ab").used_at == 5.0  # type: ignore[union-attr]
        with pytest.raises(Unauthenticated, match="already used"):
            store.enroll_site("0123456789ab", site(serial="2"), now=6.0)
        assert store.get_site("a").cert_serial == "1"  # type: ignore[union-attr]

    def test_unknown_token_changes_nothing(self, store: Store) -> None:
        with pytest.raises(Unauthenticated, match="unknown"):
            store.enroll_site("ffffffffffff", site(), now=1.0)
        assert store.list_sites() == []

    def test_racing_enrolments_consume_a_token_once(self, store: Store) -> None:
        store.add_token(token())
        outcomes: list[str] = []

        def attempt(serial: str) -> None:
            try:
                store.enroll_site("0123456789ab", site(serial=serial), now=1.0)
                outcomes.append("ok")
            except Unauthenticated:
                outcomes.append("refused")

        threads = [threading.Thread(target=attempt, args=(str(i),)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["ok"] + ["refused"] * 7

    def test_reenrolment_replaces_certificate_and_keeps_revocation(self, store: Store) -> None:
        store.add_token(token("000000000001"))
        store.add_token(token("000000000002"))
        store.enroll_site("000000000001", site(serial="1"), now=1.0)
        store.revoke_site("a", now=2.0)
        store.enroll_site("000000000002", site(serial="2"), now=3.0)
        current = store.get_site("a")
        assert current is not None and current.cert_serial == "2"
        assert current.revoked_at == 2.0
        with pytest.raises(NotFound):
            store.revoke_site("nobody", now=1.0)

    def test_heartbeats_need_an_enrolled_site(self, store: Store) -> None:
        with pytest.raises(NotFound):
            store.record_heartbeat(HeartbeatRecord("a", 1.0, "waiting"))
        store.add_token(token())
        store.enroll_site("0123456789ab", site(), now=1.0)
        store.record_heartbeat(HeartbeatRecord("a", 1.0, "waiting"))
        store.record_heartbeat(HeartbeatRecord("a", 2.0, "training", step=3, total_steps=9))
        assert store.latest_heartbeats()["a"].step == 3

    def test_heartbeat_history_is_bounded_and_oldest_first(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("coordinator.store_sites.HEARTBEAT_HISTORY", 3)
        enrolled(store, "a", "b")
        for step in range(5):
            store.record_heartbeat(HeartbeatRecord("a", float(step), "training", step=step))
        store.record_heartbeat(HeartbeatRecord("b", 9.0, "waiting"))
        assert [h.step for h in store.heartbeat_history("a")] == [2, 3, 4]
        assert [h.step for h in store.heartbeat_history("a", limit=2)] == [3, 4]
        assert [h.phase for h in store.heartbeat_history("b")] == ["waiting"]
        assert store.heartbeat_history("nobody") == []

    def test_renewal_replaces_the_current_certificate_only(self, store: Store) -> None:
        enrolled(store, "a")
        events: list[str] = []

        def event(record: SiteRecord) -> AuditEvent:
            events.append(record.cert_serial)
            return AuditEvent.new("renewed", {"serial": record.cert_serial})

        renewed = store.renew_certificate("a", "1", site(serial="2"), audit=event)
        assert renewed.cert_serial == "2" and renewed.enrolled_at == 1.0
        with pytest.raises(FailedPrecondition, match="no longer current"):
            store.renew_certificate("a", "1", site(serial="3"), audit=event)
        with pytest.raises(NotFound):
            store.renew_certificate("nobody", "1", site("nobody"), audit=event)
        store.revoke_site("a", now=2.0)
        with pytest.raises(PermissionDenied, match="revoked"):
            store.renew_certificate("a", "2", site(serial="4"), audit=event)
        assert store.get_site("a").cert_serial == "2"  # type: ignore[union-attr]
        assert events == ["2"] and store.audit_size() == 1

    def test_list_uploads_by_state(self, store: Store) -> None:
        store.begin_upload(upload("u1"))
        store.begin_upload(
            UploadRecord("u2", "a", 1, (UploadFile("x", 1, "c" * 64),), created_at=2.0)
        )
        store.finish_upload("u1", "accepted", "", 3.0)
        assert [u.upload_id for u in store.list_uploads()] == ["u1", "u2"]
        assert [u.upload_id for u in store.list_uploads("open")] == ["u2"]
        assert [u.upload_id for u in store.list_uploads("accepted")] == ["u1"]

    def test_assignments_need_a_plan_and_never_share_slots(self, store: Store) -> None:
        with pytest.raises(FailedPrecondition, match="no partition plan"):
            store.assign_expert("a", 1.0)
        store.put_plan(PlanRecord("p1", 2, 1.0))
        with pytest.raises(NotFound, match="no enrolled site"):
            store.assign_expert("stranger", 1.0)
        enrolled(store, *(f"s{i}" for i in range(6)))
        results: dict[str, int | None] = {}

        def claim(name: str) -> None:
            record = store.assign_expert(name, 1.0)
            results[name] = None if record is None else record.expert_index

        threads = [threading.Thread(target=claim, args=(f"s{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        slots = [v for v in results.values() if v is not None]
        assert sorted(slots) == [0, 1]
        holder = next(name for name, slot in results.items() if slot == 0)
        again = store.assign_expert(holder, 9.0)
        assert again is not None and again.expert_index == 0 and again.assigned_at == 1.0
        assert [a.expert_index for a in store.list_assignments()] == [0, 1]

    def test_plan_is_frozen_once_assigned(self, store: Store) -> None:
        store.put_plan(PlanRecord("p1", 2, 1.0))
        store.put_plan(PlanRecord("p2", 3, 2.0))  # no assignment yet: replaceable
        enrolled(store, "a")
        store.assign_expert("a", 3.0)
        store.put_plan(PlanRecord("p2", 3, 2.0))  # same digest: no-op
        with pytest.raises(FailedPrecondition, match="cannot change"):
            store.put_plan(PlanRecord("p3", 3, 4.0))
        assert store.get_plan().digest == "p2"  # type: ignore[union-attr]

    def test_artifacts(self, store: Store) -> None:
        store.put_artifact(ArtifactRecord("b", "x/b", 1, "c" * 64))
        store.put_artifact(ArtifactRecord("a", "x/a", 2, "d" * 64, expert=1))
        assert [a.name for a in store.list_artifacts()] == ["a", "b"]
        assert store.get_artifact("a") == ArtifactRecord("a", "x/a", 2, "d" * 64, expert=1)
        assert store.get_artifact("zzz") is None
        store.put_artifact(ArtifactRecord("base/x", "x", 1, "e" * 64))
        assert store.remove_artifacts("base/") == 1
        assert [a.name for a in store.list_artifacts()] == ["a", "b"]

    def test_upload_session_resumes_with_same_files(self, store: Store) -> None:
        first = store.begin_upload(upload("u1"))
        assert first.received == {"model.safetensors": 0, "config.json": 0}
        assert store.advance_upload("u1", "model.safetensors", 0, 4) == 4
        again = store.begin_upload(upload("u2"))
        assert again.upload_id == "u1" and again.received["model.safetensors"] == 4

    def test_chunk_rules(self, store: Store) -> None:
        store.begin_upload(upload())
        with pytest.raises(InvalidArgument, match="expected offset 0"):
            store.advance_upload("u1", "model.safetensors", 5, 1)
        with pytest.raises(InvalidArgument, match="past its declared size"):
            store.advance_upload("u1", "model.safetensors", 0, 11)
        with pytest.raises(NotFound, match="not in its file list"):
            store.advance_upload("u1", "evil.bin", 0, 1)
        with pytest.raises(NotFound, match="unknown upload"):
            store.advance_upload("nope", "model.safetensors", 0, 1)
        assert store.get_upload("u1").received["model.safetensors"] == 0  # type: ignore[union-attr]

    def test_finish_is_final(self, store: Store) -> None:
        store.begin_upload(upload())
        store.finish_upload("u1", "rejected", "digest mismatch", 2.0)
        with pytest.raises(FailedPrecondition, match="already rejected"):
            store.finish_upload("u1", "accepted", "", 3.0)
        with pytest.raises(FailedPrecondition):
            store.advance_upload("u1", "config.json", 0, 1)
        with pytest.raises(InvalidArgument):
            store.finish_upload("u1", "maybe", "", 3.0)
        # A rejected session is not resumed: the same files open a new one.
        assert store.begin_upload(upload("u9")).upload_id == "u9"

    def test_ensemble(self, store: Store) -> None:
        assert store.get_ensemble() is None
        store.publish_ensemble(EnsembleRecord("{}", ("a", "b"), 1.0))
        assert store.get_ensemble() == EnsembleRecord("{}", ("a", "b"), 1.0)

    # -- the audit log -------------------------------------------------------------------
    def test_audit_events_are_dense_and_keep_their_bytes(self, store: Store) -> None:
        assert store.audit_size() == 0 and store.audit_events() == []
        events = [AuditEvent.new("published", {"n": i}) for i in range(5)]
        records = [store.append_audit_event(e) for e in events]
        assert [r.index for r in records] == [0, 1, 2, 3, 4]
        assert store.audit_size() == 5
        stored = store.audit_events()
        assert stored == records
        assert [r.canonical for r in stored] == [e.canonical() for e in events]
        assert all(r.leaf_hash == leaf_hash(r.canonical) for r in stored)
        assert stored[3].event() == events[3]
        assert [r.index for r in store.audit_events(1, 3)] == [1, 2]
        assert [r.index for r in store.audit_events(4)] == [4]

    def test_racing_appends_get_distinct_dense_indexes(self, store: Store) -> None:
        def append(worker: int) -> None:
            for i in range(10):
                store.append_audit_event(AuditEvent.new("published", {"w": worker, "i": i}))

        threads = [threading.Thread(target=append, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.index for r in store.audit_events()] == list(range(60))

    def test_state_changes_append_their_event_once(self, store: Store) -> None:
        def event(kind: str) -> EventFn:
            return lambda record: AuditEvent.new(kind, {"record": repr(record)[:40]})

        store.add_token(token())
        store.enroll_site("0123456789ab", site(), now=1.0, audit=event("enrolled"))
        store.put_plan(PlanRecord("p1", 2, 1.0))
        assert store.assign_expert("a", 2.0, audit=event("assigned")) is not None
        again = store.assign_expert("a", 3.0, audit=event("assigned"))  # existing slot
        assert again is not None and again.assigned_at == 2.0
        store.begin_upload(upload("u1"), audit=event("upload_begun"))
        assert store.begin_upload(upload("u2"), audit=event("upload_begun")).upload_id == "u1"
        store.finish_upload("u1", "rejected", "bad", 4.0, audit=event("rejected"))
        store.revoke_site("a", 5.0, audit=event("revoked"))
        store.revoke_site("a", 6.0, audit=event("revoked"))  # already revoked: no event
        kinds = [r.event().kind for r in store.audit_events()]
        assert kinds == ["enrolled", "assigned", "upload_begun", "rejected", "revoked"]

    def test_a_failing_event_builder_changes_nothing(self, store: Store) -> None:
        def broken(record: object) -> AuditEvent:
            raise InvalidArgument("cannot describe it")

        store.add_token(token())
        with pytest.raises(InvalidArgument):
            store.enroll_site("0123456789ab", site(), now=1.0, audit=broken)
        assert store.get_site("a") is None and store.get_token("0123456789ab").used_at is None  # type: ignore[union-attr]
        enrolled(store, "b")
        store.put_plan(PlanRecord("p1", 2, 1.0))
        with pytest.raises(InvalidArgument):
            store.assign_expert("b", 1.0, audit=broken)
        assert store.get_assignment("b") is None
        store.begin_upload(upload())
        with pytest.raises(InvalidArgument):
            store.finish_upload("u1", "accepted", "", 2.0, audit=broken)
        assert store.get_upload("u1").state == "open"  # type: ignore[union-attr]
        assert store.audit_size() == 0

    def test_checkpoints_grow_in_size_and_time(self, store: Store) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        events = [AuditEvent.new("published", {"i": i}) for i in range(4)]
        for event in events[:3]:
            store.append_audit_event(event)
        start = datetime(2026, 1, 1, tzinfo=UTC)

        def head(size: int, minutes: int) -> Checkpoint:
            log = AuditLog("spiffe://t/coordinator")
            for event in events[:size]:
                log.append(event)
            at = (start + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")
            return log.checkpoint(key, at=at)

        assert store.list_checkpoints() == []
        with pytest.raises(InvalidArgument, match="holds only 3 events"):
            store.add_checkpoint(head(4, 0))
        store.add_checkpoint(head(2, 1))
        store.add_checkpoint(head(3, 2))
        with pytest.raises(FailedPrecondition, match="sign the current head again"):
            store.add_checkpoint(head(2, 3))  # smaller than the latest
        with pytest.raises(FailedPrecondition, match="sign the current head again"):
            store.add_checkpoint(head(3, 0))  # dated before the latest
        kept = head(3, 4)
        store.add_checkpoint(kept)  # same size, later: kept
        checkpoints = store.list_checkpoints()
        assert [(c.tree_size, c.timestamp) for c in checkpoints] == [
            (2, "2026-01-01T00:01:00Z"),
            (3, "2026-01-01T00:02:00Z"),
            (3, "2026-01-01T00:04:00Z"),
        ]
        assert checkpoints[-1] == kept

    def test_upload_receipt_is_kept_once(self, store: Store) -> None:
        store.begin_upload(upload())
        with pytest.raises(FailedPrecondition, match="only an accepted upload"):
            store.set_upload_receipt("u1", "{}")
        with pytest.raises(NotFound):
            store.set_upload_receipt("nope", "{}")
        store.finish_upload("u1", "accepted", "", 2.0)
        assert store.get_upload("u1").receipt_json == ""  # type: ignore[union-attr]
        assert store.set_upload_receipt("u1", '{"first":1}').receipt_json == '{"first":1}'
        assert store.set_upload_receipt("u1", '{"second":2}').receipt_json == '{"first":1}'
        assert store.get_upload("u1").receipt_json == '{"first":1}'  # type: ignore[union-attr]


EventFn = Callable[[object], AuditEvent]


def test_sqlite_audit_log_is_append_only(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.append_audit_event(AuditEvent.new("published", {}))
    store.close()
    conn = sqlite3.connect(tmp_path / "store.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit_events SET canonical = x'00'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_events")
    conn.close()


_VERSION_1_UPLOADS = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('federation', 'old');
CREATE TABLE uploads (
  upload_id TEXT PRIMARY KEY, site TEXT NOT NULL, expert_index INTEGER NOT NULL,
  manifest_key TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL,
  created_at REAL NOT NULL, updated_at REAL NOT NULL);
INSERT INTO uploads VALUES ('u0', 'a', 0, '[]', 'accepted', '', 1.0, 2.0);
"""


def test_sqlite_migrates_a_version_1_store(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path)
    conn.executescript(_VERSION_1_UPLOADS)
    conn.close()
    store = open_store(f"sqlite:///{path}")
    assert store.schema_version() == SCHEMA_VERSION
    assert store.get_meta("federation") == "old"
    old = store.get_upload("u0")
    assert old is not None and old.state == "accepted" and old.receipt_json == ""
    store.append_audit_event(AuditEvent.new("published", {}))
    assert store.audit_size() == 1
    store.close()
    reopened = open_store(f"sqlite:///{path}")  # migrating twice is a no-op
    assert reopened.schema_version() == SCHEMA_VERSION and reopened.audit_size() == 1
    reopened.close()


# A schema-3 store as the code before the one-store refactor wrote it (an SQL dump: one row of
# every table, audit events and a signed checkpoint). Today's code must open and extend it.
SCHEMA_3_DUMP = Path(__file__).parent / "fixtures" / "store-schema-3.sql"


def _columns(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every table's columns (name, type, not null, default, primary key), in name order."""
    conn = sqlite3.connect(path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    found = {t: sorted(r[1:] for r in conn.execute(f"PRAGMA table_info({t})")) for t in tables}
    conn.close()
    return found


def test_a_schema_3_store_opens_and_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_3_DUMP.read_text())
    conn.close()
    store = open_store(f"sqlite:///{path}")
    assert store.schema_version() == SCHEMA_VERSION
    assert store.get_meta("federation") == "golden"
    assert store.get_token("0123456789ab").used_at == 2.0  # type: ignore[union-attr]
    assert store.get_site("alpha") == SiteRecord(
        "alpha", "spiffe://golden/site/alpha", "0a", "PEM", 2.0
    )
    assert store.get_plan() == PlanRecord("d" * 64, 2, 3.0, '{"experts": 2}')
    assert store.get_assignment("alpha").expert_index == 0  # type: ignore[union-attr]
    assert [a.name for a in store.list_artifacts()] == ["partition/expert-0.json"]
    assert store.latest_heartbeats()["alpha"].loss == 1.5
    assert [h.step for h in store.heartbeat_history("alpha")] == [3]
    accepted, open_ = store.list_uploads()
    assert (accepted.upload_id, accepted.state, accepted.receipt_json) == (
        "u1",
        "accepted",
        '{"receipt":1}',
    )
    assert accepted.received == {"model.safetensors": 4, "config.json": 2}
    assert (open_.upload_id, open_.state, open_.received) == ("u2", "open", {"x": 1})
    kinds = [r.event().kind for r in store.audit_events()]
    assert kinds == ["invited", "enrolled", "plan_set", "assigned", "upload_begun", "accepted"]
    assert all(r.leaf_hash == leaf_hash(r.canonical) for r in store.audit_events())
    [checkpoint] = store.list_checkpoints()
    assert checkpoint.tree_size == 6
    assert (
        checkpoint.root_hash
        == AuditLog("x", [r.leaf_hash for r in store.audit_events()]).root().hex()
    )
    assert store.get_ensemble() == EnsembleRecord(
        '{"version":1}', ("ensemble/1/manifest.json",), 9.0
    )
    # ...and goes on: a chunk, a commit, an event after the checkpoint.
    assert store.advance_upload("u2", "x", 1, 2) == 3
    store.finish_upload("u2", "rejected", "digest mismatch", 10.0)
    assert store.append_audit_event(AuditEvent.new("published", {})).index == 6
    store.close()
    fresh = tmp_path / "fresh.db"
    open_store(f"sqlite:///{fresh}").close()
    assert _columns(path) == _columns(fresh)  # every table and column a new store has


def test_sqlite_refuses_a_newer_store(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE schema_version (version INTEGER NOT NULL);")
    conn.execute("INSERT INTO schema_version VALUES (99)")
    conn.commit()
    conn.close()
    with pytest.raises(FailedPrecondition, match=r"schema version 99.*upgrade Atoll"):
        open_store(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert tables == {"schema_version"}  # refused before creating anything


def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    first = open_store(url)
    first.add_token(token())
    first.enroll_site("0123456789ab", site(), now=1.0)
    first.put_plan(PlanRecord("p1", 2, 1.0))
    first.assign_expert("a", 1.0)
    first.close()
    second = open_store(url)
    assert second.get_site("a") is not None
    assert second.get_assignment("a").expert_index == 0  # type: ignore[union-attr]
    second.close()


def test_bad_store_url() -> None:
    with pytest.raises(ValueError, match="expected 'sqlite:///PATH' or 'memory://'"):
        open_store("postgres://x")
