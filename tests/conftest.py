"""Shared fixtures: a real federation (state dir, CA, SQLite) served by a real gRPC server on
loopback with mutual TLS, and sites enrolled through the real enrolment path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from federation_helpers import record_test_recipe

from coordinator import enrolment
from coordinator.artifacts import register_artifact
from coordinator.federation import init_federation
from coordinator.server import Bound, build_server
from coordinator.servicer import Coordinator
from coordinator.state import StateDir
from coordinator.store import PlanRecord
from protocol.client import FederationClient
from protocol.retry import Retry
from site_agent.agent import connect, enrol
from site_agent.workdir import Workdir


@dataclass
class Running:
    state: StateDir
    coordinator: Coordinator
    bound: Bound

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.bound.port}"

    @property
    def enrol_address(self) -> str:
        return f"127.0.0.1:{self.bound.enrol_port}"

    def invite(self, site: str, ttl: float = 3600) -> str:
        token = enrolment.invite(self.coordinator.store, self.coordinator.ca, site, ttl)
        return str(token)

    def enrol(self, tmp: Path, site: str) -> Workdir:
        workdir = Workdir(tmp / f"site-{site}")
        enrol(workdir, self.address, self.invite(site), self.enrol_address, retry=FAST_FAIL)
        return workdir

    def client(self, workdir: Workdir) -> FederationClient:
        return connect(workdir, self.address, retry=FAST_FAIL)

    def add_plan(self, num_experts: int, files: dict[str, bytes] | None = None) -> None:
        """A partition plan with the given artifacts (name -> bytes; ``expert-<k>`` names are
        restricted to expert k), as `coordinator partition` would record it."""
        store = self.coordinator.store
        for name, data in (files or {}).items():
            path = self.state.partition_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            expert = int(name.split("-")[1].split(".")[0]) if name.startswith("expert-") else None
            register_artifact(self.state, store, f"partition/{name}", path, expert=expert)
        store.put_plan(
            PlanRecord(digest="ab" * 32, num_experts=num_experts, created_at=time.time())
        )
        record_test_recipe(store)


FAST_FAIL = Retry(initial=0.05, maximum=0.2, give_up_after=2.0)


@pytest.fixture
def federation(tmp_path: Path) -> StateDir:
    return init_federation(tmp_path / "coordinator", "testfed")


@pytest.fixture
def running(federation: StateDir) -> Iterator[Running]:
    coordinator = Coordinator.open(federation, heartbeat_seconds=1)
    bound = build_server(coordinator, "127.0.0.1:0", "127.0.0.1:0")
    bound.start()
    try:
        yield Running(federation, coordinator, bound)
    finally:
        bound.stop(grace=None)
        coordinator.store.close()
