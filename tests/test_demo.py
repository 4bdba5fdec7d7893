"""The README's demo, smaller (`scripts/demo.py --quick`): a K=2 federation and its K=1 dense
baseline trained on CPU over loopback, assembled, downloaded, verified and evaluated; the
report's structure is what a newcomer is promised."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port_block() -> int:
    """A port p with p, p+1 (enrolment) and p+10, p+11 (the dense federation) all free."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + 11 > 65535:
            continue
        try:
            for offset in (1, 10, 11):
                with socket.socket() as other:
                    other.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise AssertionError("no free block of ports on loopback")


def test_quick_demo_report(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    port = str(_free_port_block())
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "demo.py"),
            "--quick",
            "--out",
            str(out),
            "--port",
            port,
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dense vs. routed ensemble" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Atoll demo report")

    # Balanced clusters: K=2, equal unique images, and the domains are the clusters.
    clusters = report["clusters"]
    assert len(clusters) == 2
    assert clusters[0]["unique_images"] == clusters[1]["unique_images"] > 0
    assert {d for c in clusters for d in c["images_by_domain"]} == {"shapes", "charts"}
    # site-b joined with no image root: it fetched exactly its shard's images.
    fetched = report["images_fetched"]["site-b"]
    assert fetched["images"] == clusters[0]["unique_images"] and fetched["bytes"] > 0

    # Both domains (and the text-only questions), with dense and ensemble numbers.
    overall = {r["benchmark"]: r for r in report["scores"] if r["task"] == "all"}
    assert {"shapes", "charts", "text-only"} <= set(overall)
    for row in overall.values():
        for system in ("dense", "ensemble_top1", "ensemble_top2"):
            assert 0.0 <= row[system] <= 1.0

    # The same number of optimizer steps for every expert and the dense model.
    steps = {name: row["total_steps"] for name, row in report["training"].items()}
    assert len(steps) == 3 and len(set(steps.values())) == 1
    assert all(row["phase"] == "done" for row in report["training"].values())

    audit = report["audit"]["demo"]
    assert audit["verified"] is True
    assert set(audit["events_per_expert"]) == {"0", "1"}
    assert all(count >= 4 for count in audit["events_per_expert"].values())
    assert report["audit"]["dense"]["events_per_expert"]["0"] >= 4

    signing = report["model_signing"]
    assert len(signing) == 3 and all(check["ok"] for check in signing)
