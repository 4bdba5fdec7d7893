"""Data set readers: LLaVA JSON/JSONL and InternVL meta, and every bad-input rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.partition.dataset import hash_images, load_dataset
from protocol.errors import InvalidArgument, NotFound

from .builders import conversation, make_images


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_llava_json_and_jsonl_read_the_same(tmp_path: Path) -> None:
    samples = [
        {"id": "a", "image": "x.png", "conversations": conversation("a")},
        {"id": 7, "conversations": conversation("text only")},
        {"id": "c", "image": ["x.png", "y.png"], "conversations": conversation("c")},
    ]
    as_json = load_dataset(write(tmp_path / "d.json", json.dumps(samples)))
    as_jsonl = load_dataset(
        write(tmp_path / "d.jsonl", "\n".join(json.dumps(s) for s in samples) + "\n\n")
    )
    for dataset in (as_json, as_jsonl):
        assert dataset.format == "llava"
        assert [s.key for s in dataset.samples] == ["a", "7", "c"]
        assert [s.images for s in dataset.samples] == [("x.png",), (), ("x.png", "y.png")]
        assert dataset.image_references == ["x.png", "y.png"]
    assert as_json.sha256 != as_jsonl.sha256  # the digest is of the file's bytes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"id": "a", "conversations": []', "malformed JSON at line 1 column"),
        ('[\n  {"id": 1,\n  oops}\n]', "line 3"),
        ('"just a string"', "expected a JSON list of samples"),
        (
            '[{"id": "a", "conversations": []}]',
            r"\[0\] \(id 'a'\): conversations: expected a non-empty",
        ),
        ('[{"conversations": [{"from": "human", "value": "x"}]}]', r"\[0\]: id: expected"),
        (
            '[{"id": "a", "conversations": [{"from": "bot", "value": "x"}]}]',
            r"conversations\[0\]\.from: expected 'human' or 'gpt', got 'bot'",
        ),
        (
            '[{"id": "a", "conversations": [{"from": "gpt", "value": 3}]}]',
            r"conversations\[0\]\.value: expected a string",
        ),
        (
            '[{"id": "a", "image": [], "conversations": [{"from": "gpt", "value": "x"}]}]',
            "image: expected a path or a non-empty list",
        ),
        (
            '[{"id": "a", "conversations": [{"from": "gpt", "value": "x"}]},'
            ' {"id": "a", "conversations": [{"from": "gpt", "value": "y"}]}]',
            r"\[1\]: duplicate sample id 'a' \(first used at \[0\]\)",
        ),
    ],
)
def test_bad_llava_json_is_named_precisely(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(InvalidArgument, match=message) as caught:
        load_dataset(path)
    assert str(path) in str(caught.value)


def test_bad_jsonl_names_the_line(tmp_path: Path) -> None:
    good = json.dumps({"id": "a", "conversations": conversation("a")})
    path = write(tmp_path / "bad.jsonl", f"{good}\n\n{{not json\n")
    with pytest.raises(InvalidArgument, match="line 3: malformed JSON"):
        load_dataset(path)
    dup = write(tmp_path / "dup.jsonl", f"{good}\n{good}\n")
    with pytest.raises(InvalidArgument, match=r"line 2: duplicate sample id 'a'.*line 1"):
        load_dataset(dup)


def test_missing_dataset_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        load_dataset(tmp_path / "nope.json")


def internvl_meta(tmp_path: Path, length: int = 2) -> Path:
    (tmp_path / "ann").mkdir()
    lines = [
        {"id": 1, "image": "p.png", "conversations": conversation("one")},
        {"image": "q.png", "conversations": conversation("two")},
    ]
    write(tmp_path / "ann" / "set.jsonl", "\n".join(json.dumps(line) for line in lines))
    write(
        tmp_path / "ann" / "text.jsonl", json.dumps({"id": "t", "conversations": conversation("t")})
    )
    meta = {
        "vision": {
            "root": "sets/vision",
            "annotation": "ann/set.jsonl",
            "repeat_time": 1,
            "length": length,
        },
        "text": {
            "root": "sets/none",
            "annotation": "ann/text.jsonl",
            "repeat_time": 0.5,
            "length": 1,
        },
    }
    return write(tmp_path / "meta.json", json.dumps(meta))


def test_internvl_meta(tmp_path: Path) -> None:
    dataset = load_dataset(internvl_meta(tmp_path))
    assert dataset.format == "internvl"
    assert [s.key for s in dataset.samples] == ["vision/1", "vision/line 2", "text/t"]
    assert dataset.samples[0].images == ("sets/vision/p.png",)
    assert dataset.samples[2].source == "text" and dataset.samples[2].images == ()
    assert dataset.meta is not None and dataset.meta["text"]["repeat_time"] == 0.5
    assert len(dataset.files) == 3


def test_internvl_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="'vision': length: the meta file says 5 samples"):
        load_dataset(internvl_meta(tmp_path, length=5))
    bad = write(
        tmp_path / "bad.json", json.dumps({"v": {"root": "r", "annotation": "missing.jsonl"}})
    )
    with pytest.raises(NotFound, match=r"'v': annotation .*missing.jsonl: no such file"):
        load_dataset(bad)
    bad = write(
        tmp_path / "bad2.json",
        json.dumps({"v": {"root": "r", "annotation": "a", "repeat_time": 0}}),
    )
    with pytest.raises(InvalidArgument, match="repeat_time: expected a number > 0"):
        load_dataset(bad)
    bad = write(tmp_path / "bad3.json", json.dumps({"v": {"annotation": "a"}}))
    with pytest.raises(InvalidArgument, match="root: expected a path"):
        load_dataset(bad)


def test_hash_images_dedupes_by_content_and_reports_missing(tmp_path: Path) -> None:
    names = make_images(tmp_path, 3)
    (tmp_path / "copy.png").write_bytes((tmp_path / names[0]).read_bytes())
    (tmp_path / "dir.png").mkdir()
    index = hash_images([*names, "copy.png", "gone.png", "dir.png"], tmp_path)
    assert index.digests["copy.png"] == index.digests[names[0]]
    assert len(set(index.digests.values())) == 3
    assert index.missing == [("gone.png", "no such file"), ("dir.png", "a directory")]
    assert "gone.png (no such file)" in index.describe_missing()
