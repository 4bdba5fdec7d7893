"""``atoll eval``: score a routed ensemble (and optionally a dense model) on a benchmark file.

The data is a LLaVA-format JSON list; each sample is one question::

    {"id": "chart-7", "image": "charts/7.png", "benchmark": "charts", "task": "read",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the value of B?"},
                       {"from": "gpt", "value": "42"}],
     "answers": ["42", "42.0"]}

``answers`` (optional) are the reference answers; without it the first ``gpt`` turn is the
only one. ``benchmark`` (default: the file's name) and ``task`` (default ``all``) group the
table's rows. The question is the first ``human`` turn with its ``<image>`` tag removed, and
is asked exactly as the experts were trained on it (the model's chat template, the image
first). Answers are greedy.

Example::

    atoll eval --ensemble ens/ --data eval.json --image-root images/ --metric vqa \\
        --dense dense-model/ --top-k 2 --json

Each system is scored with :func:`ensemble.metrics.score`; the table has one row per
(benchmark, task) and one per benchmark, and a column per system: the ensemble with top-1
routing, with top-k (``--top-k N`` > 1) and the dense model (``--dense``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ensemble.dense_model import DenseModel
from ensemble.eval_data import OVERALL, EvalSample, load_eval_data
from ensemble.metrics import METRICS, score
from ensemble.scheduling import slices
from protocol.errors import InvalidArgument
from protocol.progress import progress_bars

__all__ = [
    "Answerer",
    "EvalReport",
    "add_arguments",
    "evaluate",
    "run",
]

Answerer = Callable[[Sequence[Image.Image | None], Sequence[str]], list[str]]
"""Answers a window of questions (one image or None, one question per sample), in batches of
its own size."""

# Questions handed to each system at once, in batches. A routed ensemble fills its batches
# with one expert's questions from the window (ensemble.scheduling); only the remainders,
# about one batch per two experts, read several experts' weights, so a wider window costs
# less per question: 32 batches keeps K = 2 within a few percent of dense while the
# window's pixels and tower outputs stay well under a GPU's memory (about 2.5 GB for
# LLaVA-1.5 at 16 a batch).
WINDOW_BATCHES = 32


@dataclass
class EvalReport:
    """Scores per system, per (benchmark, task) group, and every prediction.

    Attributes:
        metric: The metric's name.
        systems: Column names, in order (e.g. ``ensemble top-1``, ``dense``).
        groups: ``(benchmark, task)`` -> number of questions; task ``all`` is the benchmark.
        scores: system -> ``"benchmark/task"`` -> mean score.
        predictions: system -> one answer per sample, in file order.
    """

    metric: str
    systems: list[str]
    groups: dict[tuple[str, str], int]
    scores: dict[str, dict[str, float]]
    predictions: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self, samples: Sequence[EvalSample]) -> dict[str, Any]:
        """The report as JSON-ready data (``--json``)."""
        return {
            "metric": self.metric,
            "systems": self.systems,
            "groups": [
                {
                    "benchmark": benchmark,
                    "task": task,
                    "n": n,
                    "scores": {s: self.scores[s][f"{benchmark}/{task}"] for s in self.systems},
                }
                for (benchmark, task), n in self.groups.items()
            ],
            "predictions": [
                {
                    "id": sample.id,
                    "answers": sample.answers,
                    **{s: self.predictions[s][i] for s in self.systems},
                }
                for i, sample in enumerate(samples)
            ],
        }


def _group_keys(sample: EvalSample) -> list[str]:
    keys = [f"{sample.benchmark}/{OVERALL}"]
    if sample.task != OVERALL:
        keys.append(f"{sample.benchmark}/{sample.task}")
    return keys


def evaluate(
    samples: Sequence[EvalSample],
    systems: dict[str, Answerer],
    metric: str,
    *,
    window: int = 16 * WINDOW_BATCHES,
    progress: bool = False,
) -> EvalReport:
    """Answers every sample with every system, ``window`` questions at a time, and scores
    the answers.

    Raises:
        InvalidArgument: an unknown metric or a window below 1.
    """
    from ensemble.router import open_image

    if metric not in METRICS:
        raise InvalidArgument(f"--metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if window < 1:
        raise InvalidArgument(f"window: expected >= 1 questions, got {window}")
    groups: dict[tuple[str, str], int] = {}
    for sample in samples:
        for key in _group_keys(sample):
            benchmark, task = key.split("/", 1)
            groups[(benchmark, task)] = groups.get((benchmark, task), 0) + 1
    groups = dict(sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] != OVERALL)))

    predictions: dict[str, list[str]] = {name: [] for name in systems}
    with progress_bars(progress) as bars:
        advance = {name: bars.add(name, len(samples)) for name in systems}
        for part in slices(len(samples), window):
            chunk = samples[part]
            images = [None if s.image is None else open_image(s.image) for s in chunk]
            questions = [s.question for s in chunk]
            for name, answer in systems.items():
                predictions[name].extend(a.strip() for a in answer(images, questions))
                advance[name](len(chunk))

    scores: dict[str, dict[str, float]] = {}
    for name in systems:
        totals: dict[str, float] = {}
        for sample, prediction in zip(samples, predictions[name], strict=True):
            value = score(metric, prediction, sample.answers)
            for key in _group_keys(sample):
                totals[key] = totals.get(key, 0.0) + value
        scores[name] = {f"{b}/{t}": totals[f"{b}/{t}"] / n for (b, t), n in groups.items()}
    return EvalReport(metric, list(systems), groups, scores, predictions)


def print_table(report: EvalReport, title: str) -> None:
    """The paper-style table: a row per benchmark (bold) and per task type, a column per
    system, scores in percent."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("benchmark")
    table.add_column("task")
    table.add_column("n", justify="right")
    for name in report.systems:
        table.add_column(name, justify="right")
    for (benchmark, task), n in report.groups.items():
        cells = [f"{100 * report.scores[s][f'{benchmark}/{task}']:.1f}" for s in report.systems]
        style = "bold" if task == OVERALL else None
        table.add_row(benchmark if task == OVERALL else "", task, str(n), *cells, style=style)
    Console(width=max(100, 30 + 16 * len(report.systems))).print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``atoll eval``'s options to ``parser``."""
    parser.add_argument("--ensemble", required=True, help="the ensemble directory")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON list of questions")
    parser.add_argument("--image-root", required=True, help="folder image paths start from")
    parser.add_argument("--metric", required=True, choices=sorted(METRICS))
    parser.add_argument("--dense", help="a dense model directory to score side by side")
    parser.add_argument("--top-k", type=int, help="also score the ensemble mixing N experts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="most rows of one model call (questions per batch)",
    )
    parser.add_argument("--trust", help="federation CA (PEM): check signatures, not only digests")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    parser.add_argument("--json", action="store_true", help="print scores and answers as JSON")


def run(args: argparse.Namespace) -> int:
    """Loads the data and models, evaluates, prints; errors raise AtollError."""
    from ensemble.runtime import RoutedEnsemble

    if args.max_new_tokens < 1:
        raise InvalidArgument(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise InvalidArgument(f"--batch-size: expected >= 1, got {args.batch_size}")
    samples = load_eval_data(Path(args.data), Path(args.image_root))
    trust = None
    if args.trust:
        try:
            trust = Path(args.trust).read_bytes()
        except OSError as error:
            raise InvalidArgument(f"--trust {args.trust}: cannot read it ({error})") from None
    ensemble = RoutedEnsemble.from_pretrained(
        Path(args.ensemble), verify=True, trust=trust, device=args.device
    )
    tokens = args.max_new_tokens

    def routed(top_k: int) -> Answerer:
        def answer(images: Sequence[Image.Image | None], questions: Sequence[str]) -> list[str]:
            return ensemble.generate(
                images, questions, tokens, top_k=top_k, batch_size=args.batch_size
            )

        return answer

    systems: dict[str, Answerer] = {"ensemble top-1": routed(1)}
    if args.top_k is not None and args.top_k != 1:
        ensemble.router._check_top_k(args.top_k)
        systems[f"ensemble top-{args.top_k}"] = routed(args.top_k)
    if args.dense:
        systems["dense"] = DenseModel(Path(args.dense), args.device, tokens, args.batch_size)
    report = evaluate(
        samples,
        systems,
        args.metric,
        window=args.batch_size * WINDOW_BATCHES,
        progress=sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(report.to_json(samples), indent=2))
    else:
        print_table(report, f"atoll eval — {args.metric} ({len(samples)} questions)")
    return 0
