"""A site fetching its shard's images from the coordinator vs. the same bytes as one artifact.

Both run end to end over loopback mutual TLS against a `coordinator serve` process: the anchor
downloads one artifact holding every image's bytes back to back (one stream, one digest); the
measured run is what `site-agent join` does without `--image-root`: one resumable
``images/<sha256>`` stream per image, a few at a time, each verified on arrival and renamed
into the shard's layout, from the image root the partition recorded. Prints each run's
throughput, their ratio (per-image cost: round trips, opens, digests, renames) and the
coordinator's peak RSS (flat memory: it must not grow with the bytes served).

    .venv/bin/python benchmarks/image_fetch.py [--images 1000] [--image-kb 150]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loopback import peak_rss_mb, record_recipe, start_coordinator  # noqa: E402
from coordinator import enrolment  # noqa: E402
from coordinator.artifacts import register_artifact  # noqa: E402
from coordinator.federation import init_federation, load_authority  # noqa: E402
from coordinator.images import record_images  # noqa: E402
from coordinator.store import PlanRecord  # noqa: E402
from protocol.download import download_artifact  # noqa: E402
from protocol.messages import ArtifactRef  # noqa: E402
from protocol.shard_manifest import (  # noqa: E402
    ShardManifest,
    shard_artifact_name,
    shard_file_name,
    shard_manifest_bytes,
)
from site_agent.agent import connect, enrol  # noqa: E402
from site_agent.images import FETCH_WORKERS, prepare_images  # noqa: E402
from site_agent.workdir import Workdir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-kb", type=int, default=150, help="LLaVA's COCO images: ~160")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atoll-image-bench-"))
    server = None
    try:
        state = init_federation(work / "coordinator", "bench")
        images = work / "images"
        blob = state.root / "artifacts" / "all-images.bin"
        blob.parent.mkdir(parents=True, exist_ok=True)
        samples = []
        with blob.open("wb") as joined:
            for i in range(args.images):
                data = os.urandom(args.image_kb * 1024)  # incompressible, as JPEGs are
                relative = f"train/{i // 100:03d}/{i:06d}.jpg"
                (images / relative).parent.mkdir(parents=True, exist_ok=True)
                (images / relative).write_bytes(data)
                joined.write(data)
                digest = hashlib.sha256(data).hexdigest()
                samples.append({"id": str(i), "image": relative, "image_sha256": digest})
        total = blob.stat().st_size
        shard = state.partition_dir / shard_file_name(0)
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(
            shard_manifest_bytes(ShardManifest(expert=0, num_experts=1, samples=samples))
        )

        store = state.open_store()
        store.put_plan(PlanRecord("00" * 32, 1, time.time()))
        register_artifact(state, store, shard_artifact_name(0), shard, expert=0)
        register_artifact(state, store, "all-images.bin", blob)
        record_recipe(store, "image-fetch-benchmark")
        record_images(state, store, images)
        token = enrolment.invite(store, load_authority(state), "site", 3600)
        store.close()

        server, port, enrol_port = start_coordinator(state)
        workdir = Workdir(work / "site")
        enrol(workdir, f"127.0.0.1:{port}", str(token), f"127.0.0.1:{enrol_port}")
        with connect(workdir) as client:
            reply = client.get_assignment()
            refs = {a.name: a for a in reply.artifacts}
            download_artifact(client, refs[shard_artifact_name(0)], workdir.artifacts_dir)
            site_shard = workdir.artifacts_dir / shard_artifact_name(0)
            baseline_rss = peak_rss_mb(server.pid)

            start = time.perf_counter()
            anchor_ref: ArtifactRef = refs["all-images.bin"]
            download_artifact(client, anchor_ref, work / "anchor")
            anchor = time.perf_counter() - start

            runs: dict[int, float] = {}
            for workers in sorted({1, FETCH_WORKERS}):
                shutil.rmtree(workdir.images_dir, ignore_errors=True)
                start = time.perf_counter()
                ready = prepare_images(
                    site_shard, workdir.images_dir, None, client, progress=True, workers=workers
                )
                runs[workers] = time.perf_counter() - start
                if ready.fetched != args.images or ready.received != total:
                    raise SystemExit(f"fetched {ready.fetched} images, {ready.received} bytes")
        rss = peak_rss_mb(server.pid)

        mb = total / 1e6
        print(f"{args.images} images of {args.image_kb} KiB ({mb:.0f} MB), loopback mTLS")
        print(f"anchor: one artifact of the same bytes   {anchor:6.2f} s  {mb / anchor:6.1f} MB/s")
        for workers, seconds in runs.items():
            print(
                f"images, {workers} stream(s) at a time{'' if workers > 1 else ' '}     "
                f"{seconds:6.2f} s  {mb / seconds:6.1f} MB/s  "
                f"{args.images / seconds:6.0f} images/s  ratio {anchor / seconds:.2f}"
            )
        print(f"coordinator peak RSS: {rss:.0f} MB (before the downloads: {baseline_rss:.0f} MB)")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
