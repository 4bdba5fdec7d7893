"""The store contract (coordinator/store.py docstrings), run against every backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    open_store,
)
from protocol.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
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
