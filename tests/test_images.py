"""A site's shard images from the coordinator, over real gRPC + mutual TLS on loopback: only
the images the site lacks travel (bytes counted on the wire), only to the site whose shard
lists them, resumed after a cut, refused when the coordinator's file changed since the
partition or when the federation does not serve images."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from coordinator.images import open_image, record_images
from protocol.download import download_artifact, download_to
from protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    VerificationFailed,
)
from protocol.messages import ArtifactRef
from protocol.shard_manifest import image_artifact_name, image_path
from site_agent.agent import Agent, connect
from site_agent.images import prepare_images
from site_agent.training.data import load_shard_manifest, verify_shard

sys.path.insert(0, str(Path(__file__).parent))
from conftest import FAST_FAIL
from tcp_proxy import CuttingProxy


def noise_png(side: int, seed: int) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about side² x 3 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Data:
    """The coordinator's copy of a K=2 data set: 6 images per shard (one shard also lists a
    picture twice, under a second path)."""

    root: Path
    shards: list[dict[str, str]]  # per expert: relative path -> sha256

    def size(self, relative: str) -> int:
        return (self.root / relative).stat().st_size


def federation_with_images(running: Any, tmp_path: Path, big: int = 0) -> Data:
    root = tmp_path / "coordinator-images"
    shards: list[dict[str, str]] = [{}, {}]
    documents: dict[str, bytes] = {}
    for k in range(2):
        samples = []
        for i in range(6):
            relative = f"set{k}/img-{i}.png"
            side = 700 if (k, i) == (0, 0) and big else 100 + 10 * i
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(noise_png(side, seed=10 * k + i))
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            shards[k][relative] = digest
            samples.append({"id": f"{k}-{i}", "image": relative, "image_sha256": digest})
        samples.append({"id": "text", "conversations": []})
        if k == 0:
            samples.append({"id": "again", "image": "copy/img-1.png", "image_sha256": shards[0]["set0/img-1.png"]})  # fmt: skip
            (root / "copy").mkdir()
            shutil.copy(root / "set0/img-1.png", root / "copy/img-1.png")
        documents[f"expert-{k}.json"] = json.dumps({"expert": k, "samples": samples}).encode()
    running.add_plan(2, documents)
    store = running.coordinator.store
    summary = record_images(running.state, store, root)
    assert summary.served and summary.images == 12  # the copy of img-1 is one of them
    assert summary.bytes == sum((root / r).stat().st_size for shard in shards for r in shard)
    return Data(root, shards)


def assigned(running: Any, tmp_path: Path, site: str = "alpha") -> tuple[Any, Path]:
    """An enrolled site with its assignment and artifacts (expert 0 for the first site)."""
    workdir = running.enrol(tmp_path, site)
    with running.client(workdir) as client:
        agent = Agent(workdir, client)
        assignment = agent.fetch_assignment()
        assert assignment is not None
        for ref in assignment.artifacts:
            download_artifact(client, ArtifactRef(**ref.model_dump()), workdir.artifacts_dir)
    shard = workdir.artifacts_dir / assignment.assignment.shard_artifact
    return workdir, shard


def test_no_image_root_fetches_the_whole_shard_and_the_agent_gets_ready(
    running: Any, tmp_path: Path
) -> None:
    data = federation_with_images(running, tmp_path)
    workdir = running.enrol(tmp_path, "alpha")
    with running.client(workdir) as client:
        agent = Agent(workdir, client)
        agent.fetch_artifacts(agent.fetch_assignment() or {})
    assert agent.phase == "ready"
    for relative, digest in data.shards[0].items():
        path = workdir.images_dir / relative
        assert not path.is_symlink() and hashlib.sha256(path.read_bytes()).hexdigest() == digest
    # The duplicate path holds the same picture, fetched once.
    assert (workdir.images_dir / "copy/img-1.png").read_bytes() == (
        data.root / "set0/img-1.png"
    ).read_bytes()
    assert not list(workdir.images_dir.rglob("*.part"))
    assert not any(p.name.startswith("set1") for p in workdir.images_dir.iterdir())


def test_half_present_copy_fetches_only_the_other_half(running: Any, tmp_path: Path) -> None:
    data = federation_with_images(running, tmp_path)
    workdir, shard = assigned(running, tmp_path)
    own = tmp_path / "site-copy"
    relatives = sorted(data.shards[0])
    present, missing = relatives[::2], relatives[1::2]
    for relative in present:
        (own / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data.root / relative, own / relative)
    missing_bytes = sum(data.size(r) for r in missing)
    proxy = CuttingProxy(running.bound.port)
    try:
        with connect(workdir, f"127.0.0.1:{proxy.port}", retry=FAST_FAIL) as client:
            ready = prepare_images(shard, workdir.images_dir, own, client)
    finally:
        proxy.close()
    assert ready.root == workdir.images_dir and ready.images == 7
    # img-1 is missing under two paths (set0/ and copy/): it travels once.
    assert ready.local == 3 and ready.fetched == 3 and ready.received == missing_bytes
    duplicate = workdir.images_dir / "copy/img-1.png"
    assert duplicate.read_bytes() == (data.root / "set0/img-1.png").read_bytes()
    # On the wire: the missing images, plus TLS and HTTP/2 overhead smaller than any image.
    smallest_present = min(data.size(r) for r in present)
    assert missing_bytes <= proxy.returned < missing_bytes + smallest_present
    for relative in present:
        assert (workdir.images_dir / relative).resolve() == (own / relative).resolve()
    for relative in missing:
        assert (workdir.images_dir / relative).read_bytes() == (data.root / relative).read_bytes()
    assert sorted(p.relative_to(own).as_posix() for p in own.rglob("*.png")) == present
    # The trainer's own check accepts the layout: links into the copy, fetched files.
    assert verify_shard(load_shard_manifest(shard), workdir.images_dir) == 7

    again = prepare_images(shard, workdir.images_dir, own, None)  # offline: nothing to fetch
    assert again.root == workdir.images_dir and again.fetched == 0


def test_complete_copy_is_used_in_place(running: Any, tmp_path: Path) -> None:
    data = federation_with_images(running, tmp_path)
    workdir, shard = assigned(running, tmp_path)
    ready = prepare_images(shard, workdir.images_dir, data.root, None)
    assert ready.root == data.root and ready.fetched == 0
    assert not workdir.images_dir.exists()


def test_a_cut_download_resumes_from_its_part_file(running: Any, tmp_path: Path) -> None:
    data = federation_with_images(running, tmp_path, big=1)
    workdir, shard = assigned(running, tmp_path)
    big = data.size("set0/img-0.png")
    assert big > 1 << 20  # streamed in more than one chunk
    proxy = CuttingProxy(running.bound.port, cut_after_returned=big // 2)
    try:
        with connect(workdir, f"127.0.0.1:{proxy.port}", retry=FAST_FAIL) as client:
            ready = prepare_images(shard, workdir.images_dir, None, client, workers=1)
        assert proxy.cuts == 1 and ready.fetched == 6
    finally:
        proxy.close()
    total = sum(data.size(r) for r in data.shards[0])
    # The resumed stream started at the part file's end: nothing arrived twice.
    assert ready.received == total
    image = workdir.images_dir / "set0/img-0.png"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == data.shards[0]["set0/img-0.png"]


def test_another_shards_image_an_unknown_digest_and_a_bad_name_are_refused(
    running: Any, tmp_path: Path
) -> None:
    data = federation_with_images(running, tmp_path)
    workdir, _ = assigned(running, tmp_path)
    theirs = next(iter(data.shards[1].values()))
    target = tmp_path / "dl" / "x.png"
    with running.client(workdir) as client:
        with pytest.raises(PermissionDenied, match="not in the shard of expert 0"):
            download_to(client, image_artifact_name(theirs), theirs, target)
        with pytest.raises(NotFound, match="no image with sha256 " + "ab" * 32):
            download_to(client, image_artifact_name("ab" * 32), "ab" * 32, target)
        with pytest.raises(InvalidArgument, match="expected images/<sha256>"):
            download_to(client, "images/../../etc/passwd", "ab" * 32, target)
    assert not target.parent.exists() or not list(target.parent.iterdir())  # no stray .part
    # Expert 1's site gets its own images, and none of expert 0's.
    other, _ = assigned(running, tmp_path, "beta")
    with running.client(other) as client:
        download_to(client, image_artifact_name(theirs), theirs, target)
        mine = data.shards[0]["set0/img-2.png"]
        with pytest.raises(PermissionDenied, match="expert 1, the one assigned to site 'beta'"):
            download_to(client, image_artifact_name(mine), mine, tmp_path / "dl" / "y.png")


def test_a_file_changed_since_the_partition_is_refused_and_logged(
    running: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = federation_with_images(running, tmp_path, big=1)
    workdir, _ = assigned(running, tmp_path)
    same_size = data.root / "set0/img-0.png"  # more than one chunk: the last is held back
    original = same_size.read_bytes()
    same_size.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    (data.root / "set0/img-3.png").write_bytes(b"shorter")
    target = workdir.images_dir / "set0/img-0.png"
    logged = caplog.at_level(logging.ERROR, logger="atoll.coordinator")
    with logged, running.client(workdir) as client:
        digest = data.shards[0]["set0/img-0.png"]
        with pytest.raises(VerificationFailed, match=r"'set0/img-0.png' .* changed on the"):
            download_to(client, image_artifact_name(digest), digest, target)
        digest = data.shards[0]["set0/img-3.png"]
        with pytest.raises(VerificationFailed, match=r"'set0/img-3.png' .* changed on the"):
            download_to(client, image_artifact_name(digest), digest, target)
    # Nothing of the changed file stays at the site; the operator's log names each file.
    assert not target.exists() and not list(workdir.images_dir.rglob("*.part"))
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{same_size} changed since the partition" in messages
    assert f"{data.root / 'set0/img-3.png'} changed since the partition" in messages


def test_streaming_holds_back_the_last_chunk_until_the_digest_matches(
    running: Any, tmp_path: Path
) -> None:
    data = federation_with_images(running, tmp_path)
    assigned(running, tmp_path)
    site = running.coordinator.store.get_site("alpha")
    digest = data.shards[0]["set0/img-0.png"]
    original = (data.root / "set0/img-0.png").read_bytes()
    state, store, name = running.state, running.coordinator.store, image_artifact_name(digest)
    ref, chunks = open_image(state, store, site, name, 1000, chunk_size=4096)
    assert ref.size == len(original) and b"".join(c for _, c in chunks) == original[1000:]
    (data.root / "set0/img-0.png").write_bytes(original[:-1] + b"\0")
    _, chunks = open_image(state, store, site, name, 0, chunk_size=4096)
    sent = []
    with pytest.raises(VerificationFailed):
        for offset, chunk in chunks:
            sent.append((offset, chunk))
    assert sum(len(c) for _, c in sent) == len(original) - (len(original) % 4096 or 4096)
    with pytest.raises(InvalidArgument, match="past its size"):
        open_image(state, store, site, name, len(original) + 1)


def test_no_serve_images_names_the_flag_and_the_way_out(running: Any, tmp_path: Path) -> None:
    data = federation_with_images(running, tmp_path)
    record_images(running.state, running.coordinator.store, data.root, serve=False)
    workdir, shard = assigned(running, tmp_path)
    with running.client(workdir) as client, pytest.raises(FailedPrecondition) as raised:
        prepare_images(shard, workdir.images_dir, None, client)
    message = str(raised.value)
    assert "--no-serve-images" in message and "pass --image-root DIR" in message
    assert "7 of the shard's 7 images are missing" in message
    # Through the agent, the coordinator's operator sees why the site stopped.
    with running.client(workdir) as client:
        agent = Agent(workdir, client)
        with pytest.raises(FailedPrecondition, match="--no-serve-images"):
            agent.run()
    assert agent.phase == "failed"
    beat = running.coordinator.store.latest_heartbeats()["alpha"]
    assert beat.phase == "failed" and "--no-serve-images" in beat.message


def test_a_wrong_local_file_is_reported_and_left_alone(running: Any, tmp_path: Path) -> None:
    federation_with_images(running, tmp_path)
    workdir, shard = assigned(running, tmp_path)
    own = tmp_path / "site-copy"
    (own / "set0").mkdir(parents=True)
    (own / "set0/img-2.png").write_bytes(b"not the federation's picture")
    wrong = pytest.raises(VerificationFailed, match=r"1 image\(s\) under --image-root .*img-2")
    with running.client(workdir) as client, wrong:
        prepare_images(shard, workdir.images_dir, own, client)
    assert (own / "set0/img-2.png").read_bytes() == b"not the federation's picture"
    assert not workdir.images_dir.exists()  # nothing fetched before the site fixes its copy


def test_an_offline_site_lacking_images_is_told_to_join(running: Any, tmp_path: Path) -> None:
    federation_with_images(running, tmp_path)
    workdir, shard = assigned(running, tmp_path)
    with pytest.raises(FailedPrecondition, match=r"7 of the shard's 7 images are missing.*join"):
        prepare_images(shard, workdir.images_dir, None, None)


def test_image_paths_stay_under_their_root(tmp_path: Path) -> None:
    (tmp_path / "copy").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "linked.png").symlink_to(tmp_path / "copy" / "linked.png")
    assert image_path(tmp_path / "root", "linked.png", "x") == tmp_path / "root" / "linked.png"
    assert image_path(tmp_path / "root", "a/./b.png", "x") == tmp_path / "root" / "a" / "b.png"
    for bad in ("../copy/linked.png", "/etc/passwd", "a/../../b.png", "."):
        with pytest.raises(InvalidArgument, match="points outside the image root"):
            image_path(tmp_path / "root", bad, "shard manifest expert-0.json: samples[0]")
