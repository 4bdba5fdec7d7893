"""The benchmark file of ``atoll eval``: a LLaVA-format JSON list, one question per sample.

See :mod:`ensemble.evaluate` for the format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import InvalidArgument, NotFound

__all__ = ["OVERALL", "EvalSample", "load_eval_data"]

IMAGE_TAG = "<image>"
OVERALL = "all"
"""The task of a sample that names none; also a benchmark's row of the table."""


@dataclass(frozen=True)
class EvalSample:
    """One question of the benchmark file."""

    id: str
    image: Path | None
    question: str
    answers: list[str]
    benchmark: str
    task: str


def _question(turn: str) -> str:
    # "<image>\nWhat is it?" -> "What is it?": the runtime puts the image before the text,
    # as the trainer does for a leading tag.
    return "".join(piece.strip("\n") for piece in turn.split(IMAGE_TAG)).strip()


def load_eval_data(path: Path, image_root: Path) -> list[EvalSample]:
    """Reads a benchmark file.

    Raises:
        NotFound: the file or an image is missing.
        InvalidArgument: the file is not a JSON list of samples, or a sample lacks a question
            or reference answer (named by its id or position).
    """
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"--data {path}: no such file") from None
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"--data {path}: not a JSON file ({error})") from None
    if not isinstance(document, list) or not document:
        raise InvalidArgument(f"--data {path}: expected a non-empty JSON list of samples")
    samples = []
    for position, sample in enumerate(document):
        where = f"--data {path}: sample {position}"
        if not isinstance(sample, dict):
            raise InvalidArgument(f"{where}: expected an object")
        name = str(sample.get("id", position))
        where = f"--data {path}: sample {name!r}"
        turns = sample.get("conversations")
        if not isinstance(turns, list):
            raise InvalidArgument(f"{where}: conversations: expected a list of turns")
        human = [t["value"] for t in turns if isinstance(t, dict) and t.get("from") == "human"]
        gpt = [t["value"] for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
        if not human or not isinstance(human[0], str) or not _question(human[0]):
            raise InvalidArgument(f"{where}: no human turn with a question")
        answers = sample.get("answers")
        if answers is None:
            answers = gpt[:1]
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) for a in answers)
        ):
            raise InvalidArgument(f"{where}: expected reference answers (a gpt turn or 'answers')")
        image = sample.get("image")
        if isinstance(image, list):
            if len(image) != 1:
                raise InvalidArgument(f"{where}: image: atoll eval takes one image per question")
            image = image[0]
        if image is not None and not isinstance(image, str):
            raise InvalidArgument(f"{where}: image: expected a path relative to --image-root")
        image_path = None if image is None else image_root / image
        if image_path is not None and not image_path.is_file():
            raise NotFound(f"{where}: image {image!r} not found under {image_root}")
        samples.append(
            EvalSample(
                id=name,
                image=image_path,
                question=_question(human[0]),
                answers=answers,
                benchmark=str(sample.get("benchmark", path.stem)),
                task=str(sample.get("task", OVERALL)),
            )
        )
    return samples
