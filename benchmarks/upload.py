"""Upload throughput over loopback mutual TLS vs. the floor for the same file.

The floor is what any verified transfer must at least do: hash the file once with
`openssl dgst -sha256` (SHA-NI) and copy it once locally. Atoll's upload is measured end to
end as a site runs it: hash the file for the manifest, BeginUpload, stream 1 MiB chunks over
gRPC + mTLS to a `coordinator serve` process, CommitUpload (digest verified). Prints the
throughput ratio (target >= 0.5) and the coordinator's peak RSS (target < 300 MB).

    .venv/bin/python benchmarks/upload.py [--size-gb 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loopback import peak_rss_mb, record_recipe, start_coordinator  # noqa: E402
from coordinator import enrolment  # noqa: E402
from coordinator.federation import init_federation, load_authority  # noqa: E402
from coordinator.store import PlanRecord  # noqa: E402
from protocol.provenance import TrainingRun, sign_expert  # noqa: E402
from site_agent.agent import connect, enrol  # noqa: E402
from site_agent.transfer import signed_manifest, upload_directory  # noqa: E402
from site_agent.workdir import Workdir  # noqa: E402


def write_random(path: Path, size: int) -> None:
    block = os.urandom(64 << 20)
    with path.open("wb") as handle:
        written = 0
        while written < size:
            n = min(len(block), size - written)
            handle.write(block[:n])
            # Vary each block so no layer can deduplicate or compress the stream.
            block = block[1:] + block[:1]
            written += n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gb", type=float, default=2.0)
    args = parser.parse_args()
    size = int(args.size_gb * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="atoll-upload-bench-"))
    server = None
    try:
        expert = work / "expert"
        expert.mkdir()
        model = expert / "model.safetensors"
        print(f"writing {size / (1 << 30):.2f} GiB of random bytes to {model} ...", flush=True)
        write_random(model, size)

        # Floor: one SHA-256 (openssl, SHA-NI) + one local copy.
        start = time.perf_counter()
        subprocess.run(["openssl", "dgst", "-sha256", str(model)], check=True, capture_output=True)
        shutil.copyfile(model, work / "copy.bin")
        floor = time.perf_counter() - start
        (work / "copy.bin").unlink()

        state = init_federation(work / "coordinator", "bench")
        store = state.open_store()
        token = enrolment.invite(store, load_authority(state), "site", 3600)
        server, port, enrol_port = start_coordinator(state)
        workdir = Workdir(work / "site")
        enrol(workdir, f"127.0.0.1:{port}", str(token), f"127.0.0.1:{enrol_port}")
        store.put_plan(PlanRecord("00" * 32, 1, time.time()))
        recipe = record_recipe(store, "upload-benchmark")
        store.close()
        with connect(workdir) as client:
            reply = client.get_assignment()
            now = datetime.now(UTC)
            run = TrainingRun(
                expert_index=0,
                assignment_digest=reply.assignment_digest,
                recipe_digest=recipe["sha256"],
                base_model_digest=recipe["base_model"]["digest"],
                shard_manifest_digest="56" * 32,
                atoll_version="bench",
                invocation_id="upload-benchmark",
                started_on=now,
                finished_on=now,
                steps=1,
                final_loss=1.0,
            )
            sign_expert(
                expert,
                run,
                private_key_path=workdir.key,
                certificate_path=workdir.cert,
                ca_path=workdir.ca,
            )
            start = time.perf_counter()
            files = signed_manifest(expert)
            hashed = time.perf_counter() - start
            result = upload_directory(client, 0, expert, progress=True, files=files)
            ours = time.perf_counter() - start
        if not result.accepted:
            raise SystemExit(f"upload not accepted: {result.reason}")
        rss = peak_rss_mb(server.pid)

        gib = size / (1 << 30)
        ratio = floor / ours
        print(f"floor (openssl dgst -sha256 + cp): {floor:6.2f} s  {gib / floor:5.2f} GiB/s")
        print(
            f"atoll upload (hash + mTLS + verified commit): {ours:6.2f} s  {gib / ours:5.2f} GiB/s"
        )
        print(f"  of which the site's upload manifest: {hashed:6.2f} s")
        print(f"throughput ratio atoll/floor: {ratio:.2f}  (target >= 0.5)")
        print(f"coordinator peak RSS: {rss:.0f} MB  (target < 300 MB)")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
