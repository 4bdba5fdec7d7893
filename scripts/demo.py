"""The whole mission on one machine: a K=2 federation and its compute-matched dense baseline,
trained on CPU over loopback, evaluated side by side.

Run by ``bash scripts/demo.sh`` (which sets up ``.venv`` first); ``--quick`` is the smaller
flow the end-to-end test runs. Every step is a real command (``coordinator``, ``site-agent``,
``atoll``, ``model_signing``) run as a subprocess and printed as ``$ ...`` so that a person can
type it; their logs go to ``OUT/logs/``. What it does:

1. writes a small LLaVA-format data set with two visually distinct domains, ``shapes`` (one
   coloured shape on a dark background: its colour, its shape, how many) and ``charts`` (bar
   charts on white: how many bars, which is tallest), text-only samples (small sums), images
   shared by several questions, and a held-out evaluation set per domain;
2. federation ``demo`` (K=2): init, partition (balanced k-means on the tiny open_clip
   encoder), recipe, serve, two invited sites that join and train in parallel (``site-b``
   has no copy of the images: it fetches its shard's from the coordinator);
3. federation ``dense`` (K=1) on the same data with the same recipe: the recipe's
   ``match-dense-steps`` schedule gives the dense model and each expert the same number of
   optimizer steps, so the two sides cost the same compute;
4. assemble both, download each with a reader token, ``atoll verify`` them, ``model_signing
   verify certificate`` every expert independently, ``coordinator audit --json``;
5. ``atoll eval``: dense vs. ensemble top-1 and top-2 per domain; writes ``report.md``,
   ``report.json`` and ``report.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw
from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
console = Console(stderr=False)

COLOURS = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 90, 235),
    "yellow": (240, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "middle", "right")
DOMAINS = ("shapes", "charts")


@dataclass(frozen=True)
class Size:
    """How big the demo is: images per domain (training and evaluation), text-only samples,
    epochs of the recipe."""

    train_images: int
    eval_images: int
    text_samples: int
    eval_text: int
    epochs: int
    learning_rate: float
    dev_images: int = 0  # per domain: a held-out set to fit the router's tau on (dev.json)


FULL = Size(
    train_images=300, eval_images=50, text_samples=150, eval_text=20, epochs=10, learning_rate=3e-3
)
QUICK = Size(
    train_images=48, eval_images=8, text_samples=16, eval_text=4, epochs=1, learning_rate=3e-3
)


# --- 1. the data set ---------------------------------------------------------------------------


def _turns(question: str, answer: str, image: bool) -> list[dict[str, str]]:
    return [
        {"from": "human", "value": ("<image>\n" if image else "") + question},
        {"from": "gpt", "value": answer},
    ]


def draw_shapes(rng: random.Random, path: Path) -> list[tuple[str, str, str]]:
    """One to three shapes of one colour and kind on a dark plain background; returns the
    (task, question, answer) triples the picture answers."""
    colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3)
    shade = rng.randint(20, 60)
    image = Image.new("RGB", (64, 64), (shade, shade, shade + 10))
    draw = ImageDraw.Draw(image)
    size = {1: 36, 2: 24, 3: 18}[count]
    for i in range(count):
        x = 4 + i * (60 // count) + rng.randint(0, max(0, 60 // count - size - 2))
        y = rng.randint(4, 60 - size)
        box = (x, y, x + size, y + size)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], COLOURS[colour])
    image.save(path)
    return [
        ("colour", "What colour are the shapes?", colour),
        ("shape", "What kind of shape is shown?", shape),
        ("count", "How many shapes are there?", str(count)),
    ]


def draw_chart(rng: random.Random, path: Path) -> list[tuple[str, str, str]]:
    """A bar chart (two to four dark bars, black axes, white background)."""
    bars = rng.randint(2, 4)
    heights = rng.sample(range(10, 54), bars)
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.line([(4, 2), (4, 60), (62, 60)], fill=(0, 0, 0), width=2)
    width = 52 // bars
    for i, height in enumerate(heights):
        x = 8 + i * width
        draw.rectangle((x, 60 - height, x + width - 4, 59), fill=(30, 60, 140))
    image.save(path)
    tallest = heights.index(max(heights))
    position = "left" if tallest == 0 else "right" if tallest == bars - 1 else "middle"
    return [
        ("count", "How many bars does the chart have?", str(bars)),
        ("tallest", "Where is the tallest bar: left, middle or right?", position),
    ]


def text_sample(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} plus {b}?", str(a + b)


Drawer = Callable[[random.Random, Path], list[tuple[str, str, str]]]
DRAWERS: dict[str, Drawer] = {"shapes": draw_shapes, "charts": draw_chart}


def caption(domain: str, questions: list[tuple[str, str, str]]) -> str:
    """A training image's caption (the alignment stage's text): its domain and every fact its
    questions ask about, e.g. ``shapes: colour red, shape circle, count 2``."""
    return f"{domain}: " + ", ".join(f"{task} {answer}" for task, _, answer in questions)


def write_dataset(
    out: Path, size: Size, seed: int = 0, drawers: dict[str, Drawer] | None = None
) -> dict[str, Any]:
    """Writes ``images/``, ``train.json``, ``eval.json`` (``dev.json`` with
    ``size.dev_images``) and ``captions.json`` (one caption per training image); returns
    counts. ``drawers`` are the visual domains (default: the demo's two)."""
    rng = random.Random(seed)
    drawers = drawers or DRAWERS
    images = out / "images"
    for domain in drawers:
        (images / domain).mkdir(parents=True, exist_ok=True)
    train: list[dict[str, Any]] = []
    evaluation: list[dict[str, Any]] = []
    development: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    drawn: set[str] = set()
    total = len(drawers) * (size.train_images + size.eval_images + size.dev_images)
    with _progress() as bar:
        task = bar.add_task("drawing images", total=total)
        for split, count, target in (
            ("train", size.train_images, train),
            ("eval", size.eval_images, evaluation),
            ("dev", size.dev_images, development),
        ):
            for domain in drawers:
                for number in range(count):
                    relative = f"{domain}/{split}-{number:04d}.png"
                    # Distinct pictures, so that unique images (what the partition balances)
                    # and files are the same count.
                    while True:
                        questions = drawers[domain](rng, images / relative)
                        digest = hashlib.sha256((images / relative).read_bytes()).hexdigest()
                        if digest not in drawn:
                            drawn.add(digest)
                            break
                    if split == "train":
                        captions.append(
                            {
                                "id": f"caption-{domain}-{number}",
                                "image": relative,
                                "benchmark": domain,
                                "task": "caption",
                                "conversations": _turns(
                                    "Describe the image.", caption(domain, questions), True
                                ),
                            }
                        )
                    # Every picture answers several questions: one image, several samples.
                    for task_name, question, answer in questions:
                        target.append(
                            {
                                "id": f"{split}-{domain}-{number}-{task_name}",
                                "image": relative,
                                "benchmark": domain,
                                "task": task_name,
                                "conversations": _turns(question, answer, True),
                            }
                        )
                    bar.advance(task)
    for split, count, target in (
        ("train", size.text_samples, train),
        ("eval", size.eval_text, evaluation),
    ):
        for number in range(count):
            question, answer = text_sample(rng)
            target.append(
                {
                    "id": f"{split}-text-{number}",
                    "benchmark": "text-only",
                    "task": "sum",
                    "conversations": _turns(question, answer, False),
                }
            )
    rng.shuffle(train)
    (out / "train.json").write_text(json.dumps(train, indent=1))
    (out / "eval.json").write_text(json.dumps(evaluation, indent=1))
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    if development:
        (out / "dev.json").write_text(json.dumps(development, indent=1))
    return {
        "train_samples": len(train),
        "eval_samples": len(evaluation),
        "train_images_per_domain": size.train_images,
        "eval_images_per_domain": size.eval_images,
        "text_only_train": size.text_samples,
        "text_only_eval": size.eval_text,
        "dev_samples": len(development),
        "captions": len(captions),
    }


def write_recipe(out: Path, size: Size) -> Path:
    """``configs/tiny-cpu.yaml`` with the demo's epochs and learning rate."""
    recipe = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    recipe["name"] = "tiny-cpu-demo"
    recipe["training"]["epochs"] = size.epochs
    recipe["training"]["learning_rate"] = size.learning_rate
    recipe["training"]["save_steps"] = 1000
    path = out / "demo-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --- running commands --------------------------------------------------------------------------


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@dataclass
class Runner:
    """Runs commands as a person would type them, logging each one's output."""

    out: Path
    commands: list[str] = field(default_factory=list)

    def show(self, argv: Sequence[str]) -> None:
        shown = " ".join(_shorten(a, self.out) for a in argv)
        self.commands.append(shown)
        console.print(f"[dim]$ {shown}[/dim]", highlight=False, soft_wrap=True)

    def __call__(self, *argv: str, log: str, env: dict[str, str] | None = None) -> str:
        self.show(argv)
        with (
            (self.out / "logs" / f"{log}.log").open("ab") as stderr,
            console.status(f"{argv[0]} {argv[1] if len(argv) > 1 else ''}"),
        ):
            done = subprocess.run(
                [_binary(argv[0]), *argv[1:]],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env or _env(),
                check=False,
                cwd=REPO,
            )
        output = done.stdout.decode()
        if done.returncode != 0:
            raise SystemExit(
                f"demo failed: `{argv[0]} {argv[1] if len(argv) > 1 else ''}` exited "
                f"{done.returncode}; see {self.out / 'logs' / (log + '.log')}\n{output[-2000:]}"
            )
        return output

    def start(
        self, *argv: str, log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.show([*argv, "&"])
        handle = (self.out / "logs" / f"{log}.log").open("ab")
        return subprocess.Popen(
            [_binary(argv[0]), *argv[1:]],
            stdout=handle,
            stderr=handle,
            env=env or _env(),
            cwd=REPO,
        )


def _binary(name: str) -> str:
    local = BIN / name
    return str(local) if local.exists() else name


def _shorten(arg: str, out: Path) -> str:
    if arg.startswith("atoll1."):
        return arg[:18] + "..."
    return arg.replace(str(REPO) + "/", "")


def _env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


TIMINGS: dict[str, float] = {}
_current: list[Any] = [time.monotonic(), ""]


def heading(text: str) -> None:
    """Starts a step of the demo, closing the previous one's timing."""
    now = time.monotonic()
    if _current[1]:
        TIMINGS[_current[1]] = round(now - _current[0], 1)
    _current[:] = [now, text]
    console.rule(f"[bold]{text}", align="left")


# --- 2.-3. the federations -------------------------------------------------------------------


@dataclass
class Federation:
    name: str
    state: Path
    port: int
    sites: list[str]
    without_images: tuple[str, ...] = ()  # sites that join with no --image-root
    partition: dict[str, Any] = field(default_factory=dict)
    server: subprocess.Popen[bytes] | None = None
    joins: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """The read-only live dashboard `serve --dashboard-listen` runs (PORT+5)."""
        return f"127.0.0.1:{self.port + 5}"


def set_up(
    run: Runner,
    federation: Federation,
    data: Path,
    recipe: Path,
    *,
    dataset: str = "train.json",
    partition: Sequence[str] = (),
    base_model: Path | None = None,
) -> dict[str, str]:
    """init, partition (with extra ``partition`` options), recipe (on ``base_model`` for a
    recipe with ``model.base: pretrained``), invite, serve; returns each site's token."""
    state = str(federation.state)
    base = [] if base_model is None else ["--base-model", str(base_model)]
    run("coordinator", "init", "--state", state, "--federation", federation.name, log="coordinator")
    federation.partition = json.loads(
        run(
            "coordinator", "partition", "--state", state, "--dataset", str(data / dataset),
            "--image-root", str(data / "images"), "--experts", str(len(federation.sites)),
            "--encoder", "open_clip:atoll-tiny-clip", "--device", "cpu", "--json", *partition,
            log=f"partition-{federation.name}",
        )
    )  # fmt: skip
    run(
        "coordinator", "recipe", "--state", state, "--recipe", str(recipe), *base, log="coordinator"
    )
    tokens = {
        site: run("coordinator", "invite", "--state", state, site, "--ttl", "1h", log="coordinator").strip()
        for site in federation.sites
    }  # fmt: skip
    federation.server = run.start(
        "coordinator", "serve", "--state", state, "--listen", federation.address,
        "--heartbeat-seconds", "1", "--dashboard-listen", federation.dashboard,
        log=f"serve-{federation.name}",
    )  # fmt: skip
    return tokens


def join_sites(
    run: Runner, federation: Federation, tokens: dict[str, str], out: Path, data: Path
) -> None:
    """One `site-agent join` per site, one torch thread each (the machine's cores are shared);
    a site without images fetches its shard's from the coordinator."""
    for site, token in tokens.items():
        images = [] if site in federation.without_images else ["--image-root", str(data / "images")]
        federation.joins[site] = run.start(
            "site-agent", "join", "--coordinator", federation.address, "--token", token,
            "--workdir", str(out / "sites" / site), *images,
            log=f"site-{site}", env=_env(threads=1),
        )  # fmt: skip


def fetched_images(federation: Federation, out: Path) -> dict[str, dict[str, int]]:
    """What each site without a copy of the images fetched into its workdir."""
    fetched = {}
    for site in federation.without_images:
        files = [p for p in (out / "sites" / site / "images").rglob("*") if p.is_file()]
        fetched[site] = {"images": len(files), "bytes": sum(p.stat().st_size for p in files)}
    return fetched


def status(run: Runner, federation: Federation) -> dict[str, Any]:
    done = subprocess.run(
        [_binary("coordinator"), "status", "--state", str(federation.state), "--json"],
        capture_output=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def wait_for_training(run: Runner, federations: list[Federation], timeout: float) -> dict[str, Any]:
    """Progress bars from `coordinator status --json` until every join has exited."""
    for federation in federations:
        run.show(["coordinator", "status", "--state", str(federation.state), "--json"])
        console.print(f"  live dashboard of {federation.name}: http://{federation.dashboard}/")
    deadline = time.monotonic() + timeout
    finals: dict[str, Any] = {}
    with _progress() as bar:
        tasks = {
            (f.name, site): bar.add_task(f"{f.name}/{site}: enrolling", total=None)
            for f in federations
            for site in f.sites
        }
        while True:
            running = False
            for federation in federations:
                rows = {r["site"]: r for r in status(run, federation)["sites"]}
                for site, process in federation.joins.items():
                    row = rows.get(site)
                    if row is not None:
                        total = row["total_steps"] or None
                        loss = f" loss {row['loss']:.3f}" if row["total_steps"] else ""
                        bar.update(
                            tasks[(federation.name, site)],
                            description=f"{federation.name}/{site}: {row['phase']}{loss}",
                            total=total,
                            completed=row["step"],
                        )
                        finals[f"{federation.name}/{site}"] = row
                    code = process.poll()
                    if code is None:
                        running = True
                    elif code != 0:
                        raise SystemExit(f"demo failed: {site} of {federation.name} exited {code}")
            if not running:
                break
            if time.monotonic() > deadline:
                raise SystemExit("demo failed: training did not finish in time (see logs/)")
            time.sleep(1.0)
    return finals


# --- 4.-5. assemble, download, verify, evaluate -------------------------------------------------


def publish_and_fetch(
    run: Runner, federation: Federation, out: Path, assemble: Sequence[str] = ()
) -> Path:
    """assemble (with extra ``assemble`` options), a reader token, atoll download, atoll
    verify; returns the downloaded dir."""
    state = str(federation.state)
    run(
        "coordinator", "assemble", "--state", state, "--top-k", "1", "--json", *assemble,
        log="coordinator",
    )  # fmt: skip
    token = run(
        "coordinator", "invite", "--state", state, "--role", "reader",
        f"reader-{federation.name}", "--ttl", "1h", log="coordinator",
    ).strip()  # fmt: skip
    target = out / "downloads" / federation.name
    run(
        "atoll", "download", "--coordinator", federation.address, "--token", token,
        "--out", str(target), "--workdir", str(out / "downloads" / f"{federation.name}-reader"),
        log=f"download-{federation.name}",
    )  # fmt: skip
    ca = str(federation.state / "ca" / "ca.pem")
    run("atoll", "verify", str(target), "--trust", ca, log=f"verify-{federation.name}")
    return target


def verify_experts(run: Runner, federation: Federation, ensemble: Path) -> list[dict[str, Any]]:
    """The OpenSSF tool, independently, on every expert of a downloaded ensemble."""
    results = []
    ca = str(federation.state / "ca" / "ca.pem")
    for expert in sorted((ensemble / "experts").iterdir()):
        argv = [
            "model_signing", "verify", "certificate", str(expert),
            "--signature", str(expert / "model.sig"), "--certificate_chain", ca,
        ]  # fmt: skip
        run.show(argv)
        done = subprocess.run(
            [_binary(argv[0]), *argv[1:]], capture_output=True, text=True, check=False
        )
        results.append(
            {
                "federation": federation.name,
                "expert": expert.name,
                "ok": done.returncode == 0,
                "output": (done.stdout + done.stderr).strip().splitlines()[-1:],
            }
        )
    return results


def audit_summary(run: Runner, federation: Federation) -> dict[str, Any]:
    """`coordinator audit --json` and the exported log's events counted per expert."""
    export = federation.state.parent / f"audit-{federation.name}.jsonl"
    report = json.loads(
        run(
            "coordinator", "audit", "--state", str(federation.state), "--json",
            "--export", str(export), log="coordinator",
        )
    )  # fmt: skip
    lines = [json.loads(line) for line in export.read_text().splitlines() if line.strip()]
    events = [line["event"] for line in lines if line.get("type") == "event"]
    # An expert's events: those naming it, those of the site it was assigned to (its
    # enrolment), and the assembly that lists it.
    site_of = {
        e["details"]["site"]: e["details"]["expert"] for e in events if e["kind"] == "assigned"
    }
    per_expert: dict[str, list[str]] = {}
    kinds: dict[str, int] = {}
    for event in events:
        kinds[event["kind"]] = kinds.get(event["kind"], 0) + 1
        details = event.get("details", {})
        experts = {entry.get("expert") for entry in details.get("experts", [])}
        experts |= {details.get("expert"), site_of.get(details.get("site", ""))}
        for expert in sorted(e for e in experts if isinstance(e, int)):
            per_expert.setdefault(str(expert), []).append(event["kind"])
    return {
        "verified": report["log"].get("verified"),
        "events": len(events),
        "event_types": kinds,
        "events_per_expert": {k: len(v) for k, v in sorted(per_expert.items())},
        "event_kinds_per_expert": dict(sorted(per_expert.items())),
        "provenance": report["provenance"],
    }


def evaluate(run: Runner, ensemble: Path, dense: Path, data: Path, out: Path) -> dict[str, Any]:
    dense_model = next(p for p in sorted((dense / "experts").iterdir()) if p.is_dir())
    report: dict[str, Any] = json.loads(
        run(
            "atoll", "eval", "--ensemble", str(ensemble), "--data", str(data / "eval.json"),
            "--image-root", str(data / "images"), "--metric", "exact", "--dense", str(dense_model),
            "--top-k", "2", "--max-new-tokens", "6", "--batch-size", "32", "--device", "cpu",
            "--json", log="eval",
        )
    )  # fmt: skip
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    return report


# --- the report ----------------------------------------------------------------------------------


def balance(federation: Federation, data: Path) -> list[dict[str, Any]]:
    """Per cluster: images, samples, text-only samples (the plan's counts) and how many of its
    images come from each domain (from the shard manifests)."""
    from protocol.partition_plan import load_plan
    from protocol.shard_manifest import load_shard_manifest, shard_file_name

    folder = federation.state / "partition"
    plan = load_plan(folder)
    rows = []
    for cluster in plan.clusters:
        shard = load_shard_manifest(folder / shard_file_name(cluster.expert))
        domains: dict[str, int] = {}
        seen = set()
        for sample in shard.samples:
            image = sample.get("image")
            digest = sample.get("image_sha256", image)
            if isinstance(image, str) and digest not in seen:
                seen.add(digest)
                domain = image.split("/", 1)[0]
                domains[domain] = domains.get(domain, 0) + 1
        rows.append(
            {
                "expert": cluster.expert,
                "unique_images": cluster.unique_images,
                "samples": cluster.samples,
                "text_only": cluster.text_only,
                "images_by_domain": domains,
            }
        )
    return rows


def score_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for group in evaluation["groups"]:
        rows.append(
            {
                "benchmark": group["benchmark"],
                "task": group["task"],
                "n": group["n"],
                "dense": group["scores"].get("dense"),
                "ensemble_top1": group["scores"].get("ensemble top-1"),
                "ensemble_top2": group["scores"].get("ensemble top-2"),
            }
        )
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def print_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="dense vs. routed ensemble (exact match, %)")
    for column in ("domain", "task", "n", "dense", "ensemble top-1", "ensemble top-2"):
        table.add_column(column, justify="left" if column in ("domain", "task") else "right")
    for row in rows:
        overall = row["task"] == "all"
        table.add_row(
            row["benchmark"] if overall else "",
            row["task"],
            str(row["n"]),
            _pct(row["dense"]),
            _pct(row["ensemble_top1"]),
            _pct(row["ensemble_top2"]),
            style="bold" if overall else None,
        )
    console.print(table)
    return table


def plot(path: Path, rows: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> bool:
    """Per-domain accuracy and the cluster balance; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    overall = [r for r in rows if r["task"] == "all"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["benchmark"] for r in overall]
    width = 0.27
    for offset, (key, label) in enumerate(
        (
            ("dense", "dense"),
            ("ensemble_top1", "ensemble top-1"),
            ("ensemble_top2", "ensemble top-2"),
        )
    ):
        values = [100 * (r[key] or 0.0) for r in overall]
        left.bar([i + (offset - 1) * width for i in range(len(names))], values, width, label=label)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("exact match (%)")
    left.set_ylim(0, 115)
    left.set_title("accuracy per domain")
    left.legend(loc="upper center", ncol=3)
    bottom = [0] * len(clusters)
    labels = [f"expert {c['expert']}" for c in clusters]
    for domain in (*DOMAINS, "text-only"):
        if domain == "text-only":
            counts = [c["text_only"] or 0 for c in clusters]
        else:
            counts = [c["images_by_domain"].get(domain, 0) for c in clusters]
        right.bar(labels, counts, bottom=bottom, label=domain)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    right.set_title("cluster balance (images by domain, text-only samples)")
    right.set_ylim(0, 1.25 * max(bottom))
    right.legend(loc="upper center", ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    lines = [
        "# Atoll demo report",
        "",
        f"Wall time {report['wall_seconds']:.0f} s on {os.cpu_count()} CPU cores "
        f"(training {report['training_seconds']:.0f} s). Data: {report['data']['train_samples']} "
        f"training samples, {report['data']['eval_samples']} evaluation questions.",
        "",
        "## Dense vs. routed ensemble (exact match, %)",
        "",
        "| domain | task | n | dense | ensemble top-1 | ensemble top-2 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in report["scores"]:
        lines.append(
            f"| {row['benchmark'] if row['task'] == 'all' else ''} | {row['task']} | {row['n']} "
            f"| {_pct(row['dense'])} | {_pct(row['ensemble_top1'])} | {_pct(row['ensemble_top2'])} |"
        )
    lines += [
        "",
        "## Cluster balance (K = 2)",
        "",
        "| expert | images | samples | text-only | images by domain |",
        "|---:|---:|---:|---:|---|",
    ]
    for c in report["clusters"]:
        by_domain = ", ".join(f"{d}: {n}" for d, n in sorted(c["images_by_domain"].items()))
        lines.append(
            f"| {c['expert']} | {c['unique_images']} | {c['samples']} | {c['text_only']} | {by_domain} |"
        )
    lines += ["", "## Training (optimizer steps, final loss)", ""]
    for name, row in report["training"].items():
        lines.append(f"* {name}: {row['step']}/{row['total_steps']} steps, loss {row['loss']:.3f}")
    for site, got in report["images_fetched"].items():
        lines.append(
            f"* {site} joined without `--image-root`: fetched {got['images']} images "
            f"({got['bytes']} bytes) of its shard from the coordinator"
        )
    lines += ["", "## Audit and signatures", ""]
    for name, audit in report["audit"].items():
        lines.append(
            f"* federation `{name}`: log verified {audit['verified']}, {audit['events']} events; "
            f"per expert {audit['events_per_expert']}; types {audit['event_types']}"
        )
    for check in report["model_signing"]:
        status_text = "ok" if check["ok"] else "FAILED"
        lines.append(
            f"* `model_signing verify certificate` {check['federation']}/{check['expert']}: {status_text}"
        )
    if report["plot"]:
        lines += ["", "![accuracy and balance](report.png)"]
    lines += ["", "## Commands", "", "```"] + report["commands"] + ["```", ""]
    path.write_text("\n".join(lines))


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("ATOLL_DEMO_DIR", "demo-out"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("ATOLL_DEMO_PORT", "7443")))
    parser.add_argument("--quick", action="store_true", help="the small flow of the CI test")
    parser.add_argument("--timeout", type=float, default=900, help="training time limit (s)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    started = time.monotonic()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    data = out / "data"
    run = Runner(out)

    heading("1. a small multimodal data set (LLaVA format)")
    counts = write_dataset(data, size)
    recipe = write_recipe(out, size)
    console.print(
        f"{counts['train_samples']} training samples ({size.train_images} images per domain, "
        f"{size.text_samples} text-only), {counts['eval_samples']} held-out questions"
    )

    demo = Federation(
        "demo", out / "coordinator", args.port, ["site-a", "site-b"], without_images=("site-b",)
    )
    dense = Federation("dense", out / "dense-coordinator", args.port + 10, ["site-dense"])
    try:
        heading("2. federation demo (K=2) and 3. the dense baseline (K=1), same recipe")
        tokens = {f.name: set_up(run, f, data, recipe) for f in (demo, dense)}
        for cluster in demo.partition.get("clusters", []):
            console.print(
                f"  partition: expert {cluster['expert']} gets {cluster['unique_images']} images, "
                f"{cluster['samples']} samples ({cluster['text_only']} text-only)",
                highlight=False,
            )
        train_started = time.monotonic()
        for federation in (demo, dense):
            join_sites(run, federation, tokens[federation.name], out, data)
        finals = wait_for_training(run, [demo, dense], args.timeout)
        training_seconds = time.monotonic() - train_started
        images_fetched = fetched_images(demo, out)
        for site, got in images_fetched.items():
            console.print(
                f"{site} joined without --image-root: fetched {got['images']} images "
                f"({decimal(got['bytes'])}) of its shard from the coordinator",
                highlight=False,
            )
        console.print(run("coordinator", "status", "--state", str(demo.state), log="coordinator"))
        console.print(run("coordinator", "status", "--state", str(dense.state), log="coordinator"))

        heading("4. assemble, download with a reader token, verify, audit")
        ensembles = {f.name: publish_and_fetch(run, f, out) for f in (demo, dense)}
        signing = [c for f in (demo, dense) for c in verify_experts(run, f, ensembles[f.name])]
        audits = {f.name: audit_summary(run, f) for f in (demo, dense)}
    finally:
        for federation in (demo, dense):
            for process in [*federation.joins.values(), federation.server]:
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(15)

    heading("5. atoll eval: dense vs. routed ensemble per domain")
    evaluation = evaluate(run, ensembles["demo"], ensembles["dense"], data, out)
    rows = score_rows(evaluation)
    clusters = balance(demo, data)
    report: dict[str, Any] = {
        "wall_seconds": 0.0,
        "training_seconds": training_seconds,
        "cpu_cores": os.cpu_count(),
        "size": size.__dict__,
        "data": counts,
        "scores": rows,
        "clusters": clusters,
        "training": finals,
        "images_fetched": images_fetched,
        "audit": audits,
        "model_signing": signing,
        "plot": False,
        "commands": run.commands,
    }
    report["plot"] = plot(out / "report.png", rows, clusters)
    heading("report")
    report["step_seconds"] = TIMINGS
    report["wall_seconds"] = time.monotonic() - started
    (out / "report.json").write_text(json.dumps(report, indent=1))
    write_markdown(out / "report.md", report)

    print_table(rows)
    for c in clusters:
        console.print(
            f"cluster {c['expert']}: {c['unique_images']} images {c['images_by_domain']}, "
            f"{c['samples']} samples, {c['text_only']} text-only",
            highlight=False,
        )
    for name, audit in audits.items():
        console.print(
            f"audit {name}: verified {audit['verified']}, {audit['events']} events, "
            f"per expert {audit['events_per_expert']}",
            highlight=False,
        )
    ok = sum(c["ok"] for c in signing)
    console.print(f"model_signing verify certificate: {ok}/{len(signing)} experts ok")
    console.print(
        f"demo finished in {report['wall_seconds']:.0f} s; report in {out / 'report.md'}"
        + ("" if report["plot"] else " (no plot: install matplotlib)")
    )
    return 0 if ok == len(signing) else 1


if __name__ == "__main__":
    sys.exit(main())
