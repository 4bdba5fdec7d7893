"""`scripts/study.py --quick`: a pretrained base, dense vs. K = 2 and K = 4 federations over
loopback, scored by exact match and answer NLL; the report holds every table, each with its
interval, and the tables are what its own runs give."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import study_report  # noqa: E402

# Under the 2-core machine's usual load the quick study takes 5 to 15 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

FEDERATIONS = 4  # the alignment stage, dense, K = 2, K = 4


def _free_port_block() -> int:
    """A port p with p + 20 i, +1 (enrolment) and +5 (dashboard) free for every federation."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + 20 * FEDERATIONS > 65535:
            continue
        try:
            for i in range(FEDERATIONS):
                for offset in (0, 1, 5):
                    with socket.socket() as other:
                        other.bind(("127.0.0.1", port + 20 * i + offset))
        except OSError:
            continue
        return port
    raise AssertionError("no free block of ports on loopback")


def _interval(cell: dict[str, float]) -> None:
    assert cell["low"] <= cell["value"] <= cell["high"], cell


def test_quick_study_report(tmp_path: Path) -> None:
    out = tmp_path / "study-out"
    done = subprocess.run(
        [
            sys.executable, str(REPO / "scripts" / "study.py"), "--quick", "--out", str(out),
            "--port", str(_free_port_block()), "--timeout", "600",
        ],
        capture_output=True, text=True, timeout=1400, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 0

    # The runs: a pretrained base (the experts' recipe names it), dense, K = 2 and K = 4.
    runs = report["runs"]
    assert {name: run["k"] for name, run in runs.items()} == {"dense-s0": 1, "k2-s0": 2, "k4-s0": 4}
    assert (out / "base" / "config.json").is_file()
    assert "--base-model" in " ".join(report["meta"]["commands"])
    for run in runs.values():
        assert len(run["ids"]) == len(run["expert_log_likelihoods"]) > 0
    assert all(0 < runs[n]["tau"] <= 1000 for n in ("k2-s0", "k4-s0"))

    # Every table, every row with an interval; three domains and all questions.
    tables = report["tables"]
    groups = {row["group"] for row in tables["main"]}
    assert groups == {"all", "shapes", "charts", "tiles"}
    systems = {row["system"] for row in tables["main"]}
    assert systems == {"dense"} | {f"K={k} {r}" for k in (2, 4) for r in study_report.ROUTINGS}
    for row in tables["main"]:
        _interval(row["exact_match"])
        _interval(row["nll_per_token"])
        assert row["nll_per_token"]["value"] > 0
    assert len(tables["parity"]) == len(groups) * 6
    for row in tables["parity"]:
        _interval(row["exact_match_difference"])
        _interval(row["nll_difference"])
    comparisons = {row["comparison"] for row in tables["ablations"]}
    assert any(c.startswith("K = 4 vs K = 2") for c in comparisons)
    assert any(c.startswith("fixed tau") for c in comparisons)
    for row in tables["ablations"]:
        for cell in (row["a"], row["b"], row["difference"]):
            _interval(cell)

    # The tables are what the runs give (recomputed from report.json's per-question scores).
    again = study_report.build(
        runs,
        seeds=report["seeds"],
        ablations=report["ablations"],
        bootstrap=report["bootstrap"]["resamples"],
        fixed_tau=report["fixed_tau"],
        meta=report["meta"],
    )
    assert again["tables"] == tables
    # ...and report.md shows them.
    for heading in ("## Dense vs. ensemble", "## Where near-parity holds", "## Ablations"):
        assert heading in markdown
    row = next(
        r for r in tables["parity"] if r["group"] == "all" and r["system"] == "K=4 posterior"
    )
    assert study_report._ci(row["nll_difference"], sign=True) in markdown
