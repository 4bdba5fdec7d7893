"""`coordinator partition` end to end: files, idempotence, store records, bad input."""

from __future__ import annotations

import argparse
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.partition import cli
from coordinator.partition.dataset import load_dataset
from coordinator.state import StateDir
from protocol.digests import file_sha256
from protocol.errors import FailedPrecondition, InvalidArgument, NotFound

from .builders import conversation, llava_samples, make_images


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def partition(state: StateDir, dataset: Path, root: Path, *extra: str) -> int:
    return cli.run(
        parse(
            "--state",
            str(state.root),
            "--dataset",
            str(dataset),
            "--image-root",
            str(root),
            "--workers",
            "0",
            "--json",
            *extra,
        )
    )


# An encoder whose files are at the machine that computed the features, not here.
ELSEWHERE = "hf:/elsewhere/clip-vit-large-patch14-336"


def features_for(dataset: Path, path: Path, seed: int = 0) -> Path:
    """A features file for every image reference (content-free random vectors), naming an
    encoder that is not on this machine (so the plan records it unchecked)."""
    references = load_dataset(dataset).image_references
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((len(references), 8))
    np.savez(path, ids=np.array(references), features=features, encoder=np.array(ELSEWHERE))
    return path


def read(path: Path) -> Any:
    return json.loads(path.read_text())


def test_llava_plan_with_text_only_and_duplicate_images(
    state: StateDir, llava: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, root = llava
    assert (
        partition(state, dataset, root, "--experts", "4", "--encoder", "open_clip:atoll-tiny-clip")
        == 0
    )
    first = json.loads(capsys.readouterr().out)
    files = sorted(p.name for p in state.partition_dir.iterdir())
    assert files == ["centroids.safetensors", *(f"expert-{k}.json" for k in range(4)), "plan.json"]
    assert not [p for p in state.root.iterdir() if p.name.startswith(".partition")]
    plan = read(state.partition_dir / "plan.json")
    assert plan["digest"] == first["digest"] and first["changed"]
    centroids = load_file(str(state.partition_dir / "centroids.safetensors"))["centroids"]
    assert centroids.shape == (4, 32) and centroids.dtype == np.float32
    assert plan["dataset"]["unique_images"] == 30 and plan["dataset"]["text_only"] == 7
    assert plan["files"]["expert-2.json"] == file_sha256(state.partition_dir / "expert-2.json")

    shards = [read(state.partition_dir / f"expert-{k}.json") for k in range(4)]
    where = {s["id"]: shard["expert"] for shard in shards for s in shard["samples"]}
    assert len(where) == 40  # every sample exactly once
    assert where["s3"] == where["dup-path"]  # the same picture under two paths
    assert where["s5"] == where["again"] and where["s7"] == where["s8"] == where["pair"]
    text = [sum(1 for s in sh["samples"] if "image" not in s) for sh in shards]
    assert max(text) - min(text) <= 1 and sum(text) == 7
    pair = next(s for sh in shards for s in sh["samples"] if s["id"] == "pair")
    assert len(pair["image_sha256"]) == 2
    for shard in shards:
        assert shard["num_experts"] == 4 and shard["dataset_samples"] == 40
        for sample in shard["samples"]:
            for image, sha in zip(
                np.atleast_1d(sample.get("image", [])),
                np.atleast_1d(sample.get("image_sha256", [])),
                strict=True,
            ):
                assert file_sha256(root / str(image)) == sha
    # 29 clustering units (images 7 and 8 share a sample): 8, 7, 7, 7 units.
    units = sorted(c["unique_images"] for c in plan["clusters"])
    assert sum(units) == 30 and units[-1] - units[0] <= 2

    store = state.open_store()
    try:
        record = store.get_plan()
        assert record is not None and record.digest == plan["digest"] and record.num_experts == 4
        artifacts = {a.name: a for a in store.list_artifacts()}
        assert artifacts["partition/expert-3.json"].expert == 3
        assert artifacts["partition/plan.json"].expert is None
        assert (
            artifacts["partition/centroids.safetensors"].sha256
            == plan["files"]["centroids.safetensors"]
        )
    finally:
        store.close()

    before = {p.name: p.read_bytes() for p in state.partition_dir.iterdir()}
    assert (
        partition(state, dataset, root, "--experts", "4", "--encoder", "open_clip:atoll-tiny-clip")
        == 0
    )
    second = json.loads(capsys.readouterr().out)
    assert second["digest"] == first["digest"] and not second["changed"]
    assert {p.name: p.read_bytes() for p in state.partition_dir.iterdir()} == before
    # The second run encoded nothing new: still one cache shard.
    assert len(list((state.root / "cache" / "features").rglob("shard-*.npz"))) == 1


def test_exact_balance_with_features_file_and_algorithms(
    state: StateDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    images = make_images(root, 103)
    dataset = root / "d.json"
    dataset.write_text(json.dumps(llava_samples(images, text_only=10)))
    features = features_for(dataset, tmp_path / "f.npz")
    digests = set()
    for extra in (
        ("--algorithm", "balanced"),
        ("--algorithm", "two-stage", "--fine-clusters", "20"),
        ("--algorithm", "balanced", "--seed", "5"),
    ):
        partition(state, dataset, root, "--experts", "7", "--features", str(features), *extra)
        report = json.loads(capsys.readouterr().out)
        counts = [c["unique_images"] for c in report["clusters"]]
        assert sorted(counts) == [14] * 2 + [15] * 5, extra
        text = [c["text_only"] for c in report["clusters"]]
        assert max(text) - min(text) <= 1
        digests.add(report["digest"])
    assert len(digests) == 3
    partition(
        state, dataset, root, "--experts", "7", "--features", str(features), "--assign", "nearest"
    )
    report = json.loads(capsys.readouterr().out)
    assert report["algorithm"]["assign"] == "nearest"
    assert sum(c["unique_images"] for c in report["clusters"]) == 103


def test_partition_records_the_image_root_sites_fetch_from(
    state: StateDir, llava: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, root = llava
    features = str(features_for(dataset, tmp_path / "f.npz"))
    assert partition(state, dataset, root, "--experts", "3", "--features", features) == 0
    assert json.loads(capsys.readouterr().out)["images_served"] is True
    with closing(sqlite3.connect(state.root / "images.db")) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        rows = conn.execute("SELECT sha256, path, size, expert FROM images").fetchall()
    assert meta["image_root"] == str(root.resolve()) and meta["served"] == "1"
    # 30 distinct pictures; the copy under a second path is in its twin's shard, indexed once.
    assert len(rows) == 30 and len({sha for sha, *_ in rows}) == 30
    for sha, path, size, expert in rows:
        assert file_sha256(root / path) == sha and (root / path).stat().st_size == size
        shard = read(state.partition_dir / f"expert-{expert}.json")
        assert any(s.get("image_sha256") == sha for s in shard["samples"])

    args = ("--experts", "3", "--features", features, "--no-serve-images")
    assert partition(state, dataset, root, *args) == 0
    assert json.loads(capsys.readouterr().out)["images_served"] is False
    with closing(sqlite3.connect(state.root / "images.db")) as conn:
        assert dict(conn.execute("SELECT key, value FROM meta").fetchall())["served"] == "0"
        assert conn.execute("SELECT count(*) FROM images").fetchone() == (0,)
    assert not [p for p in state.root.iterdir() if p.name.startswith(".images-")]


def test_subsampled_fit_still_assigns_every_image_exactly(
    state: StateDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    dataset = root / "d.json"
    images = make_images(root, 90)
    dataset.write_text(json.dumps(llava_samples(images)))
    features = features_for(dataset, tmp_path / "f.npz")
    partition(
        state,
        dataset,
        root,
        "--experts",
        "4",
        "--features",
        str(features),
        "--max-points-per-centroid",
        "5",
    )
    report = json.loads(capsys.readouterr().out)
    assert report["algorithm"]["fit_points"] == 20
    assert sorted(c["unique_images"] for c in report["clusters"]) == [22, 22, 23, 23]


def test_missing_images_fail_or_are_skipped(
    state: StateDir, llava: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dataset, root = llava
    features = features_for(dataset, tmp_path / "f.npz")
    (root / "img" / "0004.png").unlink()
    (root / "img" / "0009.png").unlink()
    with pytest.raises(NotFound, match=r"2 image\(s\) .* missing .*img/0004.png \(no such file\)"):
        partition(state, dataset, root, "--experts", "3", "--features", str(features))
    assert not state.partition_dir.exists()
    assert not [p for p in state.root.iterdir() if p.name.startswith(".partition")]
    partition(state, dataset, root, "--experts", "3", "--features", str(features), "--skip-missing")
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == {"missing_images": 2, "unreadable_images": 0, "samples": 2}
    plan = read(state.partition_dir / "plan.json")
    assert plan["sample_experts"].count(-1) == 2


def test_unreadable_image_fails_with_the_encoder(state: StateDir, llava: tuple[Path, Path]) -> None:
    dataset, root = llava
    (root / "img" / "0002.png").write_bytes(b"garbage")
    with pytest.raises(InvalidArgument, match=r"could not be decoded: img/0002.png"):
        partition(state, dataset, root, "--experts", "2", "--encoder", "open_clip:atoll-tiny-clip")
    assert not state.partition_dir.exists()


def test_bad_input_leaves_the_previous_plan_untouched(
    state: StateDir, llava: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, root = llava
    features = features_for(dataset, tmp_path / "f.npz")
    partition(state, dataset, root, "--experts", "3", "--features", str(features))
    before = {p.name: p.read_bytes() for p in state.partition_dir.iterdir()}
    with pytest.raises(
        InvalidArgument, match="--experts 31 is larger than the number of unique images"
    ):
        partition(state, dataset, root, "--experts", "31", "--features", str(features))
    np.savez(tmp_path / "short.npz", ids=np.array(["img/0000.png"]), features=np.ones((1, 8)))
    with pytest.raises(InvalidArgument, match="ids do not match the data set"):
        partition(state, dataset, root, "--experts", "3", "--features", str(tmp_path / "short.npz"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "x", "conversations": [{"from": "gpt", "value": "y"}]},\n{"id": "x"')
    with pytest.raises(InvalidArgument, match="malformed JSON at line 2"):
        partition(state, bad, root, "--experts", "3", "--features", str(features))
    assert {p.name: p.read_bytes() for p in state.partition_dir.iterdir()} == before


def test_plan_cannot_change_once_experts_are_assigned(
    state: StateDir, llava: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, root = llava
    features = features_for(dataset, tmp_path / "f.npz")
    partition(state, dataset, root, "--experts", "3", "--features", str(features))
    before = {p.name: p.read_bytes() for p in state.partition_dir.iterdir()}
    from coordinator.store import Store

    monkeypatch.setattr(Store, "list_assignments", lambda self: ["held"])
    with pytest.raises(FailedPrecondition, match="already assigned"):
        partition(state, dataset, root, "--experts", "2", "--features", str(features))
    assert {p.name: p.read_bytes() for p in state.partition_dir.iterdir()} == before
    # The same plan again is fine: nothing changes.
    assert partition(state, dataset, root, "--experts", "3", "--features", str(features)) == 0


def test_internvl_plan_and_token_counts(
    state: StateDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path / "images"
    names = make_images(root / "setA", 12)
    (tmp_path / "a.jsonl").write_text(
        "\n".join(
            json.dumps({"id": i, "image": n, "conversations": conversation(f"a {i}")})
            for i, n in enumerate(names)
        )
    )
    (tmp_path / "t.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "conversations": conversation("text")}) for i in range(5))
    )
    meta = {
        "setA": {"root": "setA", "annotation": "a.jsonl", "repeat_time": 2, "length": 12},
        "text": {"root": "none", "annotation": "t.jsonl", "repeat_time": 1, "length": 5},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    vocab = {"[UNK]": 0, "a": 1, "text": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    features = features_for(tmp_path / "meta.json", tmp_path / "f.npz")
    partition(
        state,
        tmp_path / "meta.json",
        root,
        "--experts",
        "2",
        "--features",
        str(features),
        "--tokenizer",
        str(tmp_path / "tok"),
    )
    report = json.loads(capsys.readouterr().out)
    assert [c["unique_images"] for c in report["clusters"]] == [6, 6]
    assert sum(c["tokens"] for c in report["clusters"]) > 0
    shard = read(state.partition_dir / "expert-0.json")
    assert shard["dataset_format"] == "internvl"
    assert (
        shard["datasets"]["setA"]["length"] == 6 and shard["datasets"]["setA"]["repeat_time"] == 2
    )
    image_sample = next(s for s in shard["samples"] if "image" in s)
    assert image_sample["image"].startswith("setA/img/") and image_sample["dataset"] == "setA"
    assert file_sha256(root / image_sample["image"]) == image_sample["image_sha256"]


def test_cli_requires_an_initialised_state_and_one_feature_source(tmp_path: Path) -> None:
    # Neither source parses (a text-only data set needs none: make_plan checks the data set).
    parse("--state", "s", "--dataset", "d", "--image-root", "r", "--experts", "2")
    with pytest.raises(SystemExit):
        parse(
            "--state",
            "s",
            "--dataset",
            "d",
            "--image-root",
            "r",
            "--experts",
            "2",
            "--encoder",
            "x",
            "--features",
            "f.npz",
        )
    args = parse(
        "--state",
        str(tmp_path),
        "--dataset",
        "d",
        "--image-root",
        str(tmp_path),
        "--experts",
        "2",
        "--features",
        "f.npz",
    )
    with pytest.raises(FailedPrecondition, match="not a coordinator state directory"):
        cli.run(args)
