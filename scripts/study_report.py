"""The study's tables, computed from its runs' per-question scores (``scripts/study.py``).

A run (one assembled ensemble, or the dense model as a K = 1 one) holds, per held-out
question, each system's exact match and each expert's log-likelihood of the reference answer
with the router's cosines. Everything here is a function of those: :func:`build` gives the
same tables from the same runs, so a reader (and the test) can recompute them from
``report.json``. Intervals are 95 % percentile bootstraps over questions, paired (the same
resampled questions for both sides of a difference); runs of several seeds are pooled per
question before resampling.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROUTINGS = ("top-1", "top-2", "posterior")
# Near-parity: the interval of (ensemble - dense) lies within these margins.
EM_MARGIN = 0.05  # 5 points of exact match
NLL_MARGIN = 0.05  # 5 % of the dense model's NLL per token
LEVEL = 0.95


def log_likelihoods(run: dict[str, Any], routing: str, tau: float) -> list[float]:
    """Per question, the system's log-likelihood of the reference answer: the dense model's,
    the top-1 expert's, the renormalised top-2 mixture's, or the posterior's (every expert
    weighted by ``softmax(tau * cos)``: the exact mixture of the theory, which is also what
    token-by-token posterior routing assigns to the whole answer)."""
    experts = run["expert_log_likelihoods"]
    if run["k"] == 1:
        return [row[0] for row in experts]
    keep_count = {"top-1": 1, "top-2": 2}.get(routing)
    values = []
    for cosines, row in zip(run["cosines"], experts, strict=True):
        logits = [tau * c for c in cosines]
        keep = sorted(range(len(row)), key=lambda i: -logits[i])[: keep_count or len(row)]
        top = max(logits[i] for i in keep)
        log_mass = top + math.log(sum(math.exp(logits[i] - top) for i in keep))
        mix = [logits[i] - log_mass + row[i] for i in keep]
        best = max(mix)
        values.append(best + math.log(sum(math.exp(m - best) for m in mix)))
    return values


def _system_values(run: dict[str, Any], system: str, fixed_tau: float) -> tuple[Any, Any]:
    """(exact match, log-likelihood) per question of ``system`` (``dense``, a routing, or a
    routing with `` (fixed tau)``)."""
    tau = fixed_tau if system.endswith("(fixed tau)") else run["tau"]
    routing = system.split(" ")[0]
    em = np.asarray(run["exact_match"][system], dtype=float)
    ll = np.asarray(log_likelihoods(run, routing, tau), dtype=float)
    return em, ll


def _pooled(
    runs: dict[str, dict[str, Any]], names: Sequence[str], system: str, fixed_tau: float
) -> tuple[Any, Any]:
    """Per-question values averaged over the runs of several seeds (same questions)."""
    parts = [_system_values(runs[n], system, fixed_tau) for n in names]
    return (np.mean([p[0] for p in parts], axis=0), np.mean([p[1] for p in parts], axis=0))


def _resamples(n: int, count: int) -> Any:
    """The resampled question indices: seeded, so that every table recomputes exactly."""
    return np.random.default_rng(0).integers(0, n, size=(count, n))


def _interval(statistic: Callable[[Any], Any], n: int, count: int) -> dict[str, float]:
    """The statistic on all questions and its percentile interval over resamples."""
    value = float(statistic(np.arange(n)[None, :])[0])
    samples = statistic(_resamples(n, count))
    low, high = np.quantile(samples, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"value": value, "low": float(low), "high": float(high)}


def _em(values: Any) -> Callable[[Any], Any]:
    return lambda idx: values[idx].mean(axis=1)


def _nll(ll: Any, tokens: Any) -> Callable[[Any], Any]:
    return lambda idx: -ll[idx].sum(axis=1) / tokens[idx].sum(axis=1)


def _difference(a: Callable[[Any], Any], b: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda idx: a(idx) - b(idx)


def _verdict(difference: dict[str, float], margin: float, lower_is_better: bool) -> str:
    low, high = difference["low"], difference["high"]
    if -margin <= low and high <= margin:
        return "near-parity"
    worse_above = lower_is_better
    if (low > 0) == worse_above and (low > 0 or high < 0):
        return "ensemble worse"
    if low > 0 or high < 0:
        return "ensemble better"
    return "inconclusive"


def build(
    runs: dict[str, dict[str, Any]],
    *,
    seeds: int,
    ablations: list[str],
    bootstrap: int,
    fixed_tau: float,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The report: ``meta``, ``runs`` and every table computed from them."""
    config = {
        "dense": [f"dense-s{s}" for s in range(seeds)],
        "K=2": [f"k2-s{s}" for s in range(seeds)],
        "K=4": [f"k4-s{s}" for s in range(seeds)],
    }
    first = runs[config["dense"][0]]
    benchmark = np.asarray(first["benchmark"])
    groups = {"all": np.arange(len(benchmark))}
    groups.update({b: np.flatnonzero(benchmark == b) for b in sorted(set(first["benchmark"]))})
    tokens = np.asarray(first["tokens"], dtype=float)

    def values(name: str, system: str) -> tuple[Any, Any]:
        return _pooled(runs, config[name], system, fixed_tau)

    def stats(em: Any, ll: Any, group: Any) -> dict[str, Any]:
        return {
            "exact_match": _interval(_em(em[group]), len(group), bootstrap),
            "nll_per_token": _interval(_nll(ll[group], tokens[group]), len(group), bootstrap),
        }

    dense = values("dense", "dense")
    main, parity = [], []
    for group_name, group in groups.items():
        main.append({"group": group_name, "system": "dense", "n": len(group)})
        main[-1].update(stats(*dense, group))
        for k in ("K=2", "K=4"):
            for routing in ROUTINGS:
                em, ll = values(k, routing)
                main.append({"group": group_name, "system": f"{k} {routing}", "n": len(group)})
                main[-1].update(stats(em, ll, group))
                d_em = _interval(
                    _difference(_em(em[group]), _em(dense[0][group])), len(group), bootstrap
                )
                d_nll = _interval(
                    _difference(
                        _nll(ll[group], tokens[group]), _nll(dense[1][group], tokens[group])
                    ),
                    len(group),
                    bootstrap,
                )
                dense_nll = float(-dense[1][group].sum() / tokens[group].sum())
                parity.append(
                    {
                        "group": group_name,
                        "system": f"{k} {routing}",
                        "n": len(group),
                        "exact_match_difference": d_em,
                        "nll_difference": d_nll,
                        "exact_match_verdict": _verdict(d_em, EM_MARGIN, False),
                        "nll_verdict": _verdict(d_nll, NLL_MARGIN * dense_nll, True),
                    }
                )

    everything = groups["all"]

    def compare(label: str, a: tuple[Any, Any], b: tuple[Any, Any]) -> list[dict[str, Any]]:
        n = len(everything)
        rows = []
        for metric, (fa, fb) in (
            ("exact_match", (_em(a[0]), _em(b[0]))),
            ("nll_per_token", (_nll(a[1], tokens), _nll(b[1], tokens))),
        ):
            rows.append(
                {
                    "comparison": label,
                    "metric": metric,
                    "a": _interval(fa, n, bootstrap),
                    "b": _interval(fb, n, bootstrap),
                    "difference": _interval(_difference(fa, fb), n, bootstrap),
                }
            )
        return rows

    ablation_rows = []
    for routing in ("top-1", "posterior"):
        ablation_rows += compare(
            f"K = 4 vs K = 2 ({routing})", values("K=4", routing), values("K=2", routing)
        )
    for k in ("K=2", "K=4"):
        for routing in ("top-2", "posterior"):
            ablation_rows += compare(
                f"fixed tau {fixed_tau:g} vs fitted ({k} {routing})",
                values(k, f"{routing} (fixed tau)"),
                values(k, routing),
            )
    for ablation in ablations:
        for routing in ("top-1", "posterior"):
            ablation_rows += compare(
                f"{ablation} vs default ({'K=2'} {routing}, seed 0)",
                _system_values(runs[f"k2-{ablation}-s0"], routing, fixed_tau),
                _system_values(runs["k2-s0"], routing, fixed_tau),
            )

    per_seed = []
    for seed in range(seeds):
        for name, k in (("dense", 1), ("k2", 2), ("k4", 4)):
            run = runs[f"{name}-s{seed}"]
            for system in ("dense",) if k == 1 else ROUTINGS:
                em, ll = _system_values(run, system, fixed_tau)
                per_seed.append(
                    {
                        "seed": seed,
                        "system": system if k == 1 else f"K={k} {system}",
                        "tau": run["tau"] if k > 1 else None,
                        "exact_match": float(em.mean()),
                        "nll_per_token": float(-ll.sum() / tokens.sum()),
                    }
                )
    return {
        "meta": meta,
        "bootstrap": {"resamples": bootstrap, "level": LEVEL, "seed": 0},
        "margins": {"exact_match": EM_MARGIN, "nll_relative": NLL_MARGIN},
        "seeds": seeds,
        "ablations": ablations,
        "fixed_tau": fixed_tau,
        "tables": {
            "main": main,
            "parity": parity,
            "ablations": ablation_rows,
            "per_seed": per_seed,
        },
        "runs": runs,
    }


# --- writing --------------------------------------------------------------------------------------


def _ci(cell: dict[str, float], percent: bool = False, sign: bool = False) -> str:
    scale = 100 if percent else 1
    digits = 1 if percent else 3
    form = f"{{:{'+' if sign else ''}.{digits}f}}"
    return (
        f"{form.format(scale * cell['value'])} "
        f"[{form.format(scale * cell['low'])}, {form.format(scale * cell['high'])}]"
    )


def markdown(report: dict[str, Any]) -> str:
    meta, tables = report["meta"], report["tables"]
    seconds = {"total": math.nan, "pretrain": math.nan, "federations": math.nan}
    seconds.update(meta["seconds"])
    seconds.setdefault("training", math.nan)
    lines = [
        "# Atoll study: dense vs. routed ensemble from a pretrained base",
        "",
        f"{'Quick' if meta['quick'] else 'Full'} study, {report['seeds']} seed(s), measured on "
        f"{meta['cpu_cores']} CPU cores in {seconds['total']:.0f} s (alignment stage "
        f"{seconds['pretrain']:.0f} s, federations {seconds['federations']:.0f} s: set-up, "
        f"training {seconds['training']:.0f} s, assembly, download and scoring). Data: "
        f"{meta['data']['train_samples']} training questions over three domains, "
        f"{meta['data']['captions']} captions for the alignment stage, "
        f"{meta['data']['eval_samples']} held-out questions, {meta['data']['dev_samples']} "
        "held-out questions to fit tau on.",
        "",
        f"Intervals: {100 * LEVEL:.0f} % percentile bootstrap over questions "
        f"({report['bootstrap']['resamples']} resamples, paired for differences; seeds pooled "
        "per question). NLL: the held-out reference answer's negative log-likelihood per "
        "token (answer tokens and end of sequence, teacher-forced), nats. Posterior: every "
        "expert weighted by the router (for NLL the exact mixture; for exact match, greedy "
        "decoding of that mixture with the weights held over the answer).",
        "",
        "## Dense vs. ensemble (exact match %, NLL per token)",
        "",
        "| group | system | n | exact match | NLL / token |",
        "|---|---|---:|---:|---:|",
    ]
    for row in tables["main"]:
        lines.append(
            f"| {row['group']} | {row['system']} | {row['n']} | "
            f"{_ci(row['exact_match'], percent=True)} | {_ci(row['nll_per_token'])} |"
        )
    margin = report["margins"]
    lines += [
        "",
        "## Where near-parity holds (ensemble - dense)",
        "",
        f"Near-parity: the interval lies within ±{100 * margin['exact_match']:.0f} points of "
        f"exact match, or within ±{100 * margin['nll_relative']:.0f} % of the dense NLL.",
        "",
        "| group | system | Δ exact match (points) | verdict | Δ NLL / token | verdict |",
        "|---|---|---:|---|---:|---|",
    ]
    for row in tables["parity"]:
        lines.append(
            f"| {row['group']} | {row['system']} | "
            f"{_ci(row['exact_match_difference'], percent=True, sign=True)} | "
            f"{row['exact_match_verdict']} | {_ci(row['nll_difference'], sign=True)} | "
            f"{row['nll_verdict']} |"
        )
    lines += [
        "",
        "## Ablations (all questions; difference = a - b)",
        "",
        "| comparison | metric | a | b | difference |",
        "|---|---|---:|---:|---:|",
    ]
    for row in tables["ablations"]:
        percent = row["metric"] == "exact_match"
        lines.append(
            f"| {row['comparison']} | {row['metric']} | {_ci(row['a'], percent)} | "
            f"{_ci(row['b'], percent)} | {_ci(row['difference'], percent, sign=True)} |"
        )
    lines += [
        "",
        "## Per seed (all questions)",
        "",
        "| seed | system | tau | exact match % | NLL / token |",
    ]
    lines.append("|---:|---|---:|---:|---:|")
    for row in tables["per_seed"]:
        tau = "" if row["tau"] is None else f"{row['tau']:.1f}"
        lines.append(
            f"| {row['seed']} | {row['system']} | {tau} | {100 * row['exact_match']:.1f} | "
            f"{row['nll_per_token']:.3f} |"
        )
    lines += ["", "## Partitions (images per domain per expert)", ""]
    for name, run in report["runs"].items():
        for cluster in run.get("clusters", []):
            by_domain = ", ".join(
                f"{d} {n}" for d, n in sorted(cluster["images_by_domain"].items())
            )
            lines.append(f"* {name} expert {cluster['expert']}: {by_domain}")
    lines += ["", "![accuracy, NLL and ablations](report.png)", "", "## Commands", "", "```"]
    lines += meta["commands"] + ["```", ""]
    return "\n".join(lines)


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = report["tables"]["main"]
    groups = list(dict.fromkeys(r["group"] for r in main))
    systems = list(dict.fromkeys(r["system"] for r in main))
    figure, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.8 / len(systems)
    for panel, (metric, scale, label) in zip(
        axes[:2],
        (("exact_match", 100, "exact match (%)"), ("nll_per_token", 1, "NLL per token (nats)")),
        strict=True,
    ):
        for i, system in enumerate(systems):
            rows = [
                next(r for r in main if r["group"] == g and r["system"] == system) for g in groups
            ]
            centre = [scale * r[metric]["value"] for r in rows]
            error = [
                [scale * (r[metric]["value"] - r[metric]["low"]) for r in rows],
                [scale * (r[metric]["high"] - r[metric]["value"]) for r in rows],
            ]
            x = [j + (i - len(systems) / 2 + 0.5) * width for j in range(len(groups))]
            panel.bar(x, centre, width, yerr=error, capsize=2, label=system)
        panel.set_xticks(range(len(groups)), groups)
        panel.set_ylabel(label)
    axes[0].legend(fontsize=7, ncol=2)
    rows = [r for r in report["tables"]["ablations"] if r["metric"] == "nll_per_token"]
    names = [r["comparison"] for r in rows]
    centre = [r["difference"]["value"] for r in rows]
    error = [
        [r["difference"]["value"] - r["difference"]["low"] for r in rows],
        [r["difference"]["high"] - r["difference"]["value"] for r in rows],
    ]
    axes[2].barh(range(len(rows)), centre, xerr=error, capsize=2)
    axes[2].set_yticks(range(len(rows)), names, fontsize=7)
    axes[2].axvline(0, color="black", linewidth=0.8)
    axes[2].set_xlabel("Δ NLL per token (a - b; < 0: a better)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot(out / "report.png", report)


def summary(report: dict[str, Any]) -> str:
    """One line per system on all questions: the differences to dense and the verdicts."""
    lines = ["ensemble - dense on all questions (95 % bootstrap intervals):"]
    for row in report["tables"]["parity"]:
        if row["group"] == "all":
            lines.append(
                f"  {row['system']:<14} exact match "
                f"{_ci(row['exact_match_difference'], percent=True, sign=True)} points "
                f"({row['exact_match_verdict']}); NLL/token "
                f"{_ci(row['nll_difference'], sign=True)} ({row['nll_verdict']})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Rebuilds a study's report from DIR/runs.json (kept after every stage), e.g. of a
    study stopped before its last stage; the timings say what ``progress.json`` recorded."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    runs = json.loads((args.directory / "runs.json").read_text())
    progress = args.directory / "progress.json"
    meta = json.loads(progress.read_text()) if progress.is_file() else {}
    meta.setdefault("seconds", {})
    meta.setdefault("commands", [])
    seeds = sum(1 for name in runs if name.startswith("dense-s"))
    ablations = [
        name[3:-3]
        for name in runs
        if name.startswith("k2-") and name.endswith("-s0") and name != "k2-s0"
    ]
    report = build(
        runs, seeds=seeds, ablations=ablations, bootstrap=args.bootstrap, fixed_tau=50.0, meta=meta
    )
    write(args.directory, report)
    print(summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
