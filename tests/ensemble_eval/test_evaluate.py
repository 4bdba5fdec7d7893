"""`atoll eval`: the benchmark file, scoring per benchmark and task, the dense model side by
side, the table and --json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from ensemble_runtime.test_batching import counting_forwards
from PIL import Image

from ensemble.cli import main as atoll_main
from ensemble.evaluate import DenseModel, EvalSample, evaluate, load_eval_data
from ensemble.runtime import RoutedEnsemble
from protocol.ensemble_manifest import expert_path
from protocol.errors import InvalidArgument, NotFound
from protocol.exit_codes import ExitCode


def _write(tmp_path: Path, samples: object) -> Path:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(samples))
    return path


def test_load_defaults_and_answers(benchmark: tuple[Path, Path]) -> None:
    data, images = benchmark
    samples = load_eval_data(data, images)
    assert len(samples) == 5
    first = samples[0]
    assert first.question == "What shape is this?"  # the <image> tag is the image's place
    assert first.answers == ["square"] and first.task == "red-square"
    assert first.image is not None and first.image.is_file()
    text = samples[-1]
    assert text.image is None and text.answers == ["yes", "Yes."] and text.task == "all"


def test_benchmark_defaults_to_the_file_name(tmp_path: Path) -> None:
    data = _write(
        tmp_path,
        [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "ho"}]}],
    )
    (sample,) = load_eval_data(data, tmp_path)
    assert sample.benchmark == "bench" and sample.id == "0"


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ({"not": "a list"}, "non-empty JSON list"),
        ([{"id": "q", "conversations": [{"from": "gpt", "value": "x"}]}], "'q': no human turn"),
        ([{"id": "q", "conversations": [{"from": "human", "value": "x"}]}], "reference answers"),
        (
            [{"conversations": [{"from": "human", "value": "x"}], "answers": "x"}],
            "reference answers",
        ),
    ],
)
def test_bad_data_is_named(tmp_path: Path, samples: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_eval_data(_write(tmp_path, samples), tmp_path)


def test_missing_image_and_file(tmp_path: Path) -> None:
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    data = _write(tmp_path, [{"id": "q", "image": "gone.png", "conversations": turns}])
    with pytest.raises(NotFound, match=r"'gone\.png' not found"):
        load_eval_data(data, tmp_path)
    with pytest.raises(NotFound, match="no such file"):
        load_eval_data(tmp_path / "none.json", tmp_path)


def test_scores_per_benchmark_and_task() -> None:
    samples = [
        EvalSample("a", None, "q", ["red"], "colours", "name"),
        EvalSample("b", None, "q", ["blue"], "colours", "name"),
        EvalSample("c", None, "q", ["3"], "colours", "count"),
        EvalSample("d", None, "q", ["10"], "charts", "all"),
    ]
    answers = iter([["Red", "green", "3", "10.2"]])

    def system(images: Sequence[Image.Image | None], questions: Sequence[str]) -> list[str]:
        return next(answers)

    report = evaluate(samples, {"fake": system}, "relaxed", window=4)
    assert list(report.groups) == [
        ("charts", "all"),
        ("colours", "all"),
        ("colours", "name"),  # tasks in the order the file first has them
        ("colours", "count"),
    ]
    assert report.scores["fake"] == {
        "charts/all": 1.0,
        "colours/all": pytest.approx(2 / 3),
        "colours/count": 1.0,
        "colours/name": 0.5,
    }
    with pytest.raises(InvalidArgument, match="--metric"):
        evaluate(samples, {"fake": system}, "bleu")


def test_eval_json_with_dense_and_top_2(
    ensemble_dir: Path, benchmark: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data, images = benchmark
    dense = ensemble_dir / expert_path(0)
    argv = ["eval", "--ensemble", str(ensemble_dir), "--data", str(data), "--image-root"]
    argv += [str(images), "--metric", "exact", "--dense", str(dense), "--top-k", "2"]
    argv += ["--max-new-tokens", "4", "--batch-size", "2", "--json"]
    assert atoll_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    systems = ["ensemble top-1", "ensemble top-2", "dense"]
    assert report["systems"] == systems and report["metric"] == "exact"
    groups = {(g["benchmark"], g["task"]): g for g in report["groups"]}
    assert set(groups) == {
        ("shapes", "all"),
        ("shapes", "red-square"),
        ("shapes", "blue-circle"),
        ("text", "all"),
    }
    assert groups[("shapes", "all")]["n"] == 4
    assert all(0.0 <= g["scores"][s] <= 1.0 for g in groups.values() for s in systems)
    predictions = {p["id"]: p for p in report["predictions"]}
    # Red squares route to expert 0, the "dense" model here: top-1 is its own answer.
    for name in ("red-square-0", "red-square-1"):
        assert predictions[name]["ensemble top-1"] == predictions[name]["dense"]

    # And the routed answers are what the runtime gives for the same questions.
    ensemble = RoutedEnsemble.from_pretrained(ensemble_dir, device="cpu")
    samples = load_eval_data(data, images)
    direct = ensemble.generate([s.image for s in samples], [s.question for s in samples], 4)
    assert [predictions[s.id]["ensemble top-1"] for s in samples] == [d.strip() for d in direct]


def test_dense_answers_like_its_expert(ensemble_dir: Path, benchmark: tuple[Path, Path]) -> None:
    data, images = benchmark
    samples = load_eval_data(data, images)[:2]
    pictures = [Image.open(s.image) for s in samples if s.image]
    dense = DenseModel(ensemble_dir / expert_path(0), "cpu", max_new_tokens=4)
    ensemble = RoutedEnsemble.from_pretrained(ensemble_dir, device="cpu")
    questions = [s.question for s in samples]
    answers = [a.strip() for a in ensemble.generate(pictures, questions, 4, top_k=1)]
    assert dense(pictures, questions) == answers
    dense.batch_size = 1
    with counting_forwards([dense.model]) as calls:
        assert dense(pictures, questions) == answers
    with counting_forwards([dense.model]) as one_call:
        dense.batch_size = 2
        dense(pictures, questions)
    assert calls[0] > one_call[0]  # a question a batch: more, smaller calls


def test_table_and_errors(
    ensemble_dir: Path,
    benchmark: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, images = benchmark
    base = ["eval", "--ensemble", str(ensemble_dir), "--data", str(data)]
    base += ["--image-root", str(images), "--metric", "vqa", "--max-new-tokens", "2"]
    assert atoll_main(base) == 0
    out = capsys.readouterr().out
    assert "ensemble top-1" in out and "shapes" in out and "red-square" in out
    assert atoll_main([*base, "--top-k", "3"]) == ExitCode.BAD_INPUT
    assert "top_k" in capsys.readouterr().err
    assert atoll_main([*base, "--dense", str(tmp_path)]) == ExitCode.NOT_FOUND
    assert "no config.json" in capsys.readouterr().err
