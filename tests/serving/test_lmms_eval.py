"""lmms-eval, offline, runs the ensemble through the ``atoll`` model entry point on local tasks
(YAML over a JSON-lines file written here): its answers are ``RoutedEnsemble.generate``'s, its
per-choice losses :func:`continuation_log_likelihood`'s, and its VQA accuracy and
ANLS on those answers are compared with ``ensemble/metrics.py``'s."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ensemble_runtime.builders import picture

from ensemble import metrics
from ensemble.likelihood import continuation_log_likelihood
from ensemble.runtime import RoutedEnsemble

from .lmms_eval_venv import lmms_eval_venv

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What is in the picture?"
CHOICES = ["yes", "no", "red", "blue"]
PICTURES = [("red-square", 1), ("blue-circle", 2), ("red-square", 3), ("blue-circle", 1)]

UTILS = """
from PIL import Image
from lmms_eval.tasks.vizwiz_vqa.utils import vizwiz_vqa_process_results

def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]

def doc_to_text(doc):
    return doc["question"]

def doc_to_choice(doc):
    return doc["choices"]

def vqa_process_results(doc, results):
    # lmms-eval's VizWiz scorer: the VQA accuracy over EvalAI-normalised answers.
    doc = dict(doc, question_id=doc["id"], answers=list(doc["answers"]))
    return {"exact_match": vizwiz_vqa_process_results(doc, results)["exact_match"]}
"""


def _task(name: str, data: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n" + body
    )


GENERATE = """output_type: generate_until
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  until: []
"""


def _answers(prediction: str, case: int) -> list[str]:
    """References that score the prediction fully, partly, and not at all."""
    return [
        [prediction] * 10,
        [prediction] * 2 + ["no"] * 8,
        [f"  {prediction}x  "] + ["no"] * 9,  # ANLS: a near miss, padded with spaces
        ["no"] * 10,
    ][case]


def test_lmms_eval_scores_the_ensemble(
    ensemble: RoutedEnsemble, ensemble_dir: Path, tmp_path: Path
) -> None:
    venv = lmms_eval_venv(REPO)
    images = []
    for i, kind in enumerate(PICTURES):
        images.append(tmp_path / f"picture-{i}.png")
        picture(*kind).save(images[-1])
    predictions = ensemble.generate(images, [QUESTION] * len(images), 4, top_k=1)
    rows = [
        {"id": i, "image": str(path), "question": QUESTION, "answers": _answers(p, i),
         "choices": CHOICES, "label": i % len(CHOICES)}
        for i, (path, p) in enumerate(zip(images, predictions, strict=True))
    ]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    vqa = "process_results: !function utils.vqa_process_results\ndoc_to_target: answers\n"
    vqa += (
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "atoll_vqa.yaml").write_text(_task("atoll_vqa", data, GENERATE + vqa))
    anls = "doc_to_target: answers\nmetric_list:\n  - metric: anls\n    aggregation: mean\n"
    anls += "    higher_is_better: true\n"
    (tasks / "atoll_anls.yaml").write_text(_task("atoll_anls", data, GENERATE + anls))
    choice = "output_type: multiple_choice\ndoc_to_choice: !function utils.doc_to_choice\n"
    choice += "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
    choice += "    higher_is_better: true\n"
    (tasks / "atoll_choice.yaml").write_text(_task("atoll_choice", data, choice))

    out = tmp_path / "out"
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = os.environ | offline | {"PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    command = [
        str(venv / "bin" / "python"), "-m", "lmms_eval", "--model", "atoll",
        "--model_args", f"ensemble={ensemble_dir},top_k=1,device=cpu",
        "--tasks", "atoll_vqa,atoll_anls,atoll_choice", "--include_path", str(tasks),
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    run = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path
    )
    # lmms-eval logs an error and still exits 0: its results files are the proof of a run.
    assert run.returncode == 0 and list(out.rglob("*_results.json")), (
        run.stdout[-3000:] + run.stderr[-3000:]
    )

    vqa_samples = _samples(out, "atoll_vqa")
    anls_samples = _samples(out, "atoll_anls")
    for doc_id, prediction in enumerate(predictions):
        answers = rows[doc_id]["answers"]
        assert vqa_samples[doc_id]["filtered_resps"] in (prediction, [prediction])
        # VQA accuracy: lmms-eval's EvalAI normalisation and Atoll's (the official
        # evaluator's) agree on these answers.
        assert vqa_samples[doc_id]["exact_match"] == pytest.approx(
            metrics.vqa_accuracy(prediction, answers)
        )
        theirs = anls_samples[doc_id]["anls"]
        ours = metrics.anls(prediction, answers)
        if doc_id == 2:
            # lmms-eval divides the distance of the normalised strings by the longer raw
            # string (spaces included); Atoll by the longer normalised one.
            assert theirs > ours > 0
        else:
            assert theirs == pytest.approx(ours)
    assert [
        metrics.vqa_accuracy(p, r["answers"]) for p, r in zip(predictions, rows, strict=True)
    ] == [pytest.approx(v) for v in (1.0, 0.6, 0.0, 0.0)]

    choice_samples = _samples(out, "atoll_choice")
    for doc_id, path in enumerate(images):
        scored = [
            continuation_log_likelihood(ensemble, _open(path), QUESTION, " " + c, top_k=1)
            for c in CHOICES
        ]
        # lmms-eval's convention: the mean negative log-likelihood per token; lowest wins.
        losses = [-s.log_probability / s.tokens for s in scored]
        logged = [float(pair[0]) for pair in choice_samples[doc_id]["filtered_resps"]]
        assert logged == [pytest.approx(loss, abs=1e-4) for loss in losses]
        best = min(range(len(CHOICES)), key=losses.__getitem__)
        assert choice_samples[doc_id]["acc"] == float(best == rows[doc_id]["label"])


def _open(path: Path) -> Any:
    from PIL import Image

    return Image.open(path).convert("RGB")


def _samples(out: Path, task: str) -> dict[int, dict[str, Any]]:
    found = sorted(out.rglob(f"*_samples_{task}*.jsonl"))
    assert len(found) == 1, (task, sorted(str(p.relative_to(out)) for p in out.rglob("*")))
    path = found[0]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["doc_id"]: row for row in rows}
