"""The paper's claim at small scale: does a routed ensemble of experts trained apart match a
compute-matched dense model trained on everything, when both start from a pretrained base?

``python scripts/study.py --out study-out`` (``--quick``: the small flow CI runs). Every
federation is real: the commands of ``scripts/demo.py`` (``coordinator init / partition /
recipe / invite / serve``, ``site-agent join`` per site, ``assemble``, ``atoll download``,
``atoll verify``) over loopback with mutual TLS, trained on CPU. What it does:

1. draws three visual domains whose skills overlap (``shapes``: colour, shape, count;
   ``charts``: count, tallest bar; ``tiles``: colour, count), a held-out evaluation set and a
   held-out set to fit the router's temperature on;
2. pretrains a base with an alignment stage: a K = 1 federation on one caption per training
   image (projector and language model train, the vision tower stays frozen, as in
   LLaVA-1.5), from the tiny randomly initialised model of ``configs/tiny-cpu.yaml``;
3. from that base (``coordinator recipe --base-model``), per seed, the dense baseline (K = 1)
   and federations at K = 2 and K = 4, compute-matched (``match-dense-steps``: every expert
   takes the dense run's optimizer steps on its share of the data), assembled with
   ``--fit-tau dev.json``; and the ablations (K = 2): two-stage partition, no centring;
4. scores dense vs. ensemble top-1, top-2 and posterior by exact match and by the held-out
   reference answers' negative log-likelihood per token (``ensemble.calibration``), with
   fitted and fixed tau;
5. writes ``report.md``, ``report.json`` and plots (``scripts/study_report.py``): bootstrap
   intervals over questions, per seed and pooled.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo
import study_report

FIXED_TAU = 50.0  # `coordinator assemble`'s default, what the fitted tau is compared with


def draw_tiles(rng: random.Random, path: Path) -> list[tuple[str, str, str]]:
    """One to four square tiles of one colour in a 2 x 2 grid on a light grey background: a
    third domain that shares colour with ``shapes`` and counting with both others."""
    colour, count = rng.choice(list(demo.COLOURS)), rng.randint(1, 4)
    shade = rng.randint(190, 230)
    image = Image.new("RGB", (64, 64), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for slot in rng.sample(range(4), count):
        x = 4 + (slot % 2) * 30 + rng.randint(0, 6)
        y = 4 + (slot // 2) * 30 + rng.randint(0, 6)
        draw.rectangle((x, y, x + 20, y + 20), fill=demo.COLOURS[colour], outline=(0, 0, 0))
    image.save(path)
    return [
        ("colour", "What colour are the tiles?", colour),
        ("count", "How many tiles are there?", str(count)),
    ]


DRAWERS: dict[str, demo.Drawer] = {**demo.DRAWERS, "tiles": draw_tiles}


@dataclass(frozen=True)
class StudySize:
    """How big the study is."""

    data: demo.Size
    pretrain_epochs: int
    seeds: int
    ablations: tuple[str, ...]
    fine_clusters: int
    bootstrap: int


QUICK = StudySize(
    data=demo.Size(
        train_images=16, eval_images=12, text_samples=0, eval_text=0, epochs=1,
        learning_rate=3e-3, dev_images=4,
    ),
    pretrain_epochs=1, seeds=1, ablations=(), fine_clusters=6, bootstrap=1000,
)  # fmt: skip
FULL = StudySize(
    data=demo.Size(
        train_images=90, eval_images=40, text_samples=0, eval_text=0, epochs=6,
        learning_rate=3e-3, dev_images=12,
    ),
    pretrain_epochs=6, seeds=2, ablations=("two-stage", "no-center"), fine_clusters=12,
    bootstrap=2000,
)  # fmt: skip

# Extra `coordinator partition` options of each ablation (K = 2, seed 0).
ABLATIONS = {
    "two-stage": ["--algorithm", "two-stage", "--fine-clusters", "{fine}"],
    "no-center": ["--no-center"],
}


Plan = tuple[demo.Federation, Path, list[str]]
"""A federation, its recipe and its extra `coordinator partition` options."""


def write_recipe(out: Path, name: str, epochs: int, lr: float, seed: int, base: bool) -> Path:
    """``configs/tiny-cpu.yaml`` with the study's epochs, learning rate and seed; ``base``:
    ``model.base: pretrained`` (the alignment stage's checkpoint) instead of a random init."""
    recipe = yaml.safe_load((demo.REPO / "configs" / "tiny-cpu.yaml").read_text())
    recipe["name"] = name
    recipe["training"].update(epochs=epochs, learning_rate=lr, seed=seed, save_steps=1000)
    if base:
        recipe["model"]["base"] = "pretrained"
        del recipe["model"]["tiny"], recipe["model"]["init_seed"]
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train_federations(
    run: demo.Runner,
    federations: list[Plan],
    data: Path,
    out: Path,
    timeout: float,
    *,
    dataset: str = "train.json",
    base: Path | None = None,
) -> tuple[dict[str, Any], float]:
    """Sets up every federation, trains all their sites at once, stops the servers once
    assembled and downloaded; returns the final status rows and the training time."""
    finals: dict[str, Any] = {}
    try:
        tokens = {
            f.name: demo.set_up(
                run, f, data, recipe, dataset=dataset, partition=partition, base_model=base
            )
            for f, recipe, partition in federations
        }
        started = time.monotonic()
        for federation, _, _ in federations:
            demo.join_sites(run, federation, tokens[federation.name], out, data)
        finals = demo.wait_for_training(run, [f for f, _, _ in federations], timeout)
        seconds = time.monotonic() - started
        assemble = [] if base is None else [
            "--fit-tau", str(data / "dev.json"), "--fit-image-root", str(data / "images")
        ]  # fmt: skip
        for federation, _, _ in federations:
            demo.publish_and_fetch(
                run, federation, out, assemble if len(federation.sites) > 1 else []
            )
    finally:
        for federation, _, _ in federations:
            for process in [*federation.joins.values(), federation.server]:
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(15)
    return finals, seconds


def pretrain(
    run: demo.Runner, out: Path, data: Path, size: StudySize, port: int, timeout: float
) -> Path:
    """The alignment stage as a K = 1 federation on the captions; returns the base folder
    (the downloaded expert's model files, its signature left out)."""
    recipe = write_recipe(
        out, "study-align", size.pretrain_epochs, size.data.learning_rate, 42, base=False
    )
    align = demo.Federation("align", out / "align-coordinator", port, ["site-align"])
    train_federations(run, [(align, recipe, [])], data, out, timeout, dataset="captions.json")
    expert = next(
        p for p in sorted((out / "downloads" / "align" / "experts").iterdir()) if p.is_dir()
    )
    base = out / "base"
    shutil.copytree(expert, base, ignore=shutil.ignore_patterns("model.sig"))
    return base


# --- scoring --------------------------------------------------------------------------------------


def score(ensemble_dir: Path, data: Path, max_new_tokens: int = 6) -> dict[str, Any]:
    """Per held-out question: exact match of top-1, top-2 and posterior (every expert mixed
    by the router) answers, each expert's log-likelihood of the reference answer, the
    router's cosines, the answer's token count; answers at the manifest's (fitted) tau and at
    the fixed one (the NLL at any tau follows from the stored scores). A K = 1 ensemble (the dense model) has one system, ``dense``."""
    from ensemble.calibration import answer_log_likelihoods
    from ensemble.evaluate import load_eval_data
    from ensemble.metrics import exact_match
    from ensemble.router import open_image
    from ensemble.runtime import RoutedEnsemble

    samples = load_eval_data(data / "eval.json", data / "images")
    ensemble = RoutedEnsemble.from_pretrained(ensemble_dir, verify=True, device="cpu")
    k = ensemble.manifest.num_experts
    images = [open_image(s.image) for s in samples if s.image is not None]
    if len(images) != len(samples):
        raise SystemExit("study: every evaluation question has an image")
    questions = [s.question for s in samples]
    answers = [s.answers[0] for s in samples]
    scores = answer_log_likelihoods(ensemble, images, questions, answers, batch_size=32)
    tokens = [
        len(ensemble.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers
    ]

    def matches(top_k: int) -> list[float]:
        texts = ensemble.generate(images, questions, max_new_tokens, top_k=top_k, batch_size=32)
        return [exact_match(t.strip(), s.answers) for t, s in zip(texts, samples, strict=True)]

    fitted = ensemble.router.tau
    result: dict[str, Any] = {
        "k": k,
        "tau": fitted,
        "ids": [s.id for s in samples],
        "benchmark": [s.benchmark for s in samples],
        "task": [s.task for s in samples],
        "tokens": tokens,
        "cosines": scores.cosines.tolist(),
        "expert_log_likelihoods": scores.log_likelihoods.tolist(),
        "exact_match": {},
    }
    if k == 1:
        result["exact_match"]["dense"] = matches(1)
        return result
    result["exact_match"]["top-1"] = matches(1)  # the same at any tau
    for name, tau in (("", fitted), (" (fixed tau)", FIXED_TAU)):
        ensemble.router.tau = tau
        top2 = result["exact_match"][f"top-2{name}"] = matches(2)
        result["exact_match"][f"posterior{name}"] = matches(k) if k > 2 else top2
    ensemble.router.tau = fitted
    return result


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="study-out")
    parser.add_argument("--port", type=int, default=int(os.environ.get("ATOLL_STUDY_PORT", "7600")))
    parser.add_argument("--quick", action="store_true", help="the small flow of the CI test")
    parser.add_argument("--seeds", type=int, help="training seeds of dense, K = 2, K = 4")
    parser.add_argument("--timeout", type=float, default=3600, help="per training stage (s)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    seeds = args.seeds or size.seeds
    started = time.monotonic()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    data = out / "data"
    run = demo.Runner(out)
    timings: dict[str, float] = {}

    demo.heading("1. three visual domains with overlapping skills")
    counts = demo.write_dataset(data, size.data, drawers=DRAWERS)
    demo.console.print(
        f"{counts['train_samples']} training questions, {counts['captions']} captions, "
        f"{counts['eval_samples']} held-out questions, {counts['dev_samples']} to fit tau on"
    )

    demo.heading("2. alignment stage: the base (K = 1 federation on the captions)")
    mark = time.monotonic()
    base = pretrain(run, out, data, size, args.port, args.timeout)
    timings["pretrain"] = round(time.monotonic() - mark, 1)

    demo.heading("3. dense, K = 2 and K = 4 from the base (and ablations), compute-matched")
    # One stage per seed (dense, K = 2, K = 4 train side by side), then the ablations: at
    # most seven sites train at once on the shared cores.
    ports = iter(range(args.port + 20, 65536, 20))

    def plan(name: str, k: int, recipe: Path, seed: int, options: Sequence[str] = ()) -> Plan:
        sites = [f"{name}-site{i}" for i in range(k)]
        federation = demo.Federation(name, out / f"{name}-coordinator", next(ports), sites)
        partition = [o.format(fine=size.fine_clusters) for o in options]
        return federation, recipe, [*partition, "--seed", str(seed)]

    stages: list[list[Plan]] = []
    for seed in range(seeds):
        recipe = write_recipe(
            out, f"study-seed{seed}", size.data.epochs, size.data.learning_rate, 42 + seed, True
        )
        stages.append([plan(f"dense-s{seed}", 1, recipe, seed)])
        stages[-1] += [plan(f"k{k}-s{seed}", k, recipe, seed) for k in (2, 4)]
        if seed == 0 and size.ablations:
            stages.append([plan(f"k2-{a}-s0", 2, recipe, 0, ABLATIONS[a]) for a in size.ablations])
    finals: dict[str, Any] = {}
    runs: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {
        "quick": args.quick,
        "size": {**size.data.__dict__, "pretrain_epochs": size.pretrain_epochs},
        "data": counts,
        "cpu_cores": os.cpu_count(),
        "seconds": timings,
        "training": finals,
        "commands": run.commands,
    }
    mark = time.monotonic()
    timings["training"] = 0.0
    for number, stage in enumerate(stages, 1):
        names = ", ".join(f.name for f, _, _ in stage)
        demo.console.print(f"stage {number}/{len(stages)}: {names}", highlight=False)
        trained, seconds = train_federations(run, stage, data, out, args.timeout, base=base)
        finals.update(trained)
        timings["training"] += round(seconds, 1)
        for federation, _, _ in stage:
            runs[federation.name] = score(out / "downloads" / federation.name, data)
            clusters = demo.balance(federation, data) if len(federation.sites) > 1 else []
            runs[federation.name]["clusters"] = clusters
        # Kept as they come: a stage that fails later loses none of the scores before it
        # (`python scripts/study_report.py OUT` rebuilds a report from them).
        (out / "runs.json").write_text(json.dumps(runs))
        meta["seconds"] = {**timings, "total": round(time.monotonic() - started, 1)}
        (out / "progress.json").write_text(json.dumps(meta))
    timings["federations"] = round(time.monotonic() - mark, 1)

    demo.heading("5. report")
    timings["total"] = round(time.monotonic() - started, 1)
    report = study_report.build(
        runs,
        seeds=seeds,
        ablations=list(size.ablations),
        bootstrap=size.bootstrap,
        fixed_tau=FIXED_TAU,
        meta={**meta, "seconds": timings},
    )
    study_report.write(out, report)
    demo.console.print(study_report.summary(report))
    demo.console.print(f"study finished in {timings['total']:.0f} s; report in {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
