"""The study's tables from per-question scores (scripts/study_report.py), on runs made up here:
mixtures, intervals and verdicts behave as their definitions say."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import study_report


def _run(k: int, log_likelihoods: list[list[float]], cosines: list[list[float]]) -> dict[str, Any]:
    n = len(log_likelihoods)
    systems = ["dense"] if k == 1 else [
        f"{r}{t}" for r in study_report.ROUTINGS for t in ("", " (fixed tau)")
    ]  # fmt: skip
    return {
        "k": k,
        "tau": 10.0,
        "ids": [str(i) for i in range(n)],
        "benchmark": ["a" if i % 2 else "b" for i in range(n)],
        "task": ["t"] * n,
        "tokens": [2] * n,
        "cosines": cosines,
        "expert_log_likelihoods": log_likelihoods,
        "exact_match": {s: [float(i % 3 != 0) for i in range(n)] for s in systems},
    }


def test_mixtures_follow_the_router_weights() -> None:
    run = _run(2, [[-1.0, -3.0]], [[0.2, 0.1]])
    top1, top2, posterior = (
        study_report.log_likelihoods(run, r, 10.0)[0] for r in study_report.ROUTINGS
    )
    w = 1 / (1 + math.exp(-1.0))  # softmax(10 * (0.2, 0.1))[0]
    assert top1 == pytest.approx(-1.0)
    assert posterior == pytest.approx(math.log(w * math.exp(-1) + (1 - w) * math.exp(-3)))
    assert top2 == pytest.approx(posterior)  # K = 2: top-2 is every expert
    # A very sharp router is top-1; a flat one the plain average.
    assert study_report.log_likelihoods(run, "posterior", 1e4)[0] == pytest.approx(-1.0)
    flat = study_report.log_likelihoods(run, "posterior", 1e-9)[0]
    assert flat == pytest.approx(math.log((math.exp(-1) + math.exp(-3)) / 2))


def _runs(ensemble_shift: float) -> dict[str, dict[str, Any]]:
    n = 40
    dense = [[-1.0 - 0.1 * (i % 5)] for i in range(n)]
    experts = [[row[0] + ensemble_shift, row[0] + ensemble_shift] for row in dense]
    return {
        "dense-s0": _run(1, dense, [[1.0]] * n),
        "k2-s0": _run(2, experts, [[0.3, 0.1]] * n),
        "k4-s0": _run(4, [r * 2 for r in experts], [[0.3, 0.1, 0.0, -0.1]] * n),
    }


def _build(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return study_report.build(runs, seeds=1, ablations=[], bootstrap=200, fixed_tau=50.0, meta={})


def test_identical_systems_are_at_parity_with_zero_width_differences() -> None:
    report = _build(_runs(0.0))
    for row in report["tables"]["parity"]:
        for cell in (row["exact_match_difference"], row["nll_difference"]):
            assert cell["value"] == pytest.approx(0.0, abs=1e-9)
            assert cell["low"] == pytest.approx(0.0, abs=1e-9)
        assert row["exact_match_verdict"] == row["nll_verdict"] == "near-parity"
    main = {(r["group"], r["system"]): r for r in report["tables"]["main"]}
    # NLL per token: answers of 2 tokens.
    expected = sum(1.0 + 0.1 * (i % 5) for i in range(40)) / 80
    assert main[("all", "dense")]["nll_per_token"]["value"] == pytest.approx(expected)
    assert main[("all", "K=4 posterior")]["nll_per_token"]["value"] == pytest.approx(expected)
    assert {g for g, _ in main} == {"all", "a", "b"}


def test_a_worse_ensemble_is_called_worse_and_tables_recompute() -> None:
    runs = _runs(-0.5)  # every expert 0.5 nats less likely per answer: 0.25 per token
    report = _build(runs)
    row = next(
        r for r in report["tables"]["parity"] if r["group"] == "all" and r["system"] == "K=2 top-1"
    )
    assert row["nll_difference"]["value"] == pytest.approx(0.25)
    assert row["nll_verdict"] == "ensemble worse"
    assert _build(runs)["tables"] == report["tables"]
    markdown = study_report.markdown(
        {**report, "meta": {"quick": True, "cpu_cores": 2, "seconds": dict.fromkeys(
            ("total", "pretrain", "federations", "training", "scoring"), 1.0
        ), "data": {"train_samples": 1, "captions": 1, "eval_samples": 40, "dev_samples": 1},
            "commands": []}}
    )  # fmt: skip
    assert "ensemble worse" in markdown and "+0.250 [+0.250, +0.250]" in markdown
