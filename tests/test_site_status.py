"""`coordinator status`: a site is flagged silent when its heartbeats stop, unless it finished."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from coordinator.sites import SILENT_AFTER_BEATS, federation_status, heartbeat_interval
from coordinator.store import HeartbeatRecord


def test_only_unfinished_sites_go_silent(running: Any, tmp_path: Path) -> None:
    store = running.coordinator.store
    for name in ("busy", "finished"):
        running.enrol(tmp_path, name)
    at = time.time()
    store.record_heartbeat(HeartbeatRecord("busy", at, "training", 5, 10))
    store.record_heartbeat(HeartbeatRecord("finished", at, "done", 10, 10))
    later = at + heartbeat_interval(store) * SILENT_AFTER_BEATS + 1
    rows = {row.site: row.silent for row in federation_status(store, now=later)}
    assert rows == {"busy": True, "finished": False}
    assert not any(row.silent for row in federation_status(store, now=at))
