"""Signing and verifying a 4 GB expert, against the sha256 floor of ``openssl dgst``.

Writes an expert directory of N safetensors files (random U8 tensors, default 4 x 1 GiB) and a
config into a temporary directory, then times, over ``--repeat`` warm-cache rounds:

* anchor: ``openssl dgst -sha256`` over the same files, one process per core at a time (the
  hashing floor with SHA-NI; coreutils ``sha256sum`` is several times slower);
* ``sign``: :func:`protocol.provenance.sign_expert` (``model.sig`` + provenance);
* ``verify``: :func:`protocol.provenance.verify_expert` (chain, signatures, every file);
* ``model_signing hash``: the ``model_signing`` library hashing the directory (its defaults).

and prints each throughput as a ratio to the anchor's, timed side by side (the anchor runs
just before each candidate, every round; the median ratio is reported; target: at least 0.9 for
sign and verify). The directory is removed afterwards unless ``--keep``.

    .venv/bin/python benchmarks/signing.py [--gib-per-file 1] [--files 4] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rich.progress import Progress, TaskID, track

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.provenance import TrainingRun, sign_expert, verify_expert

_BLOCK = 64 << 20


def write_safetensors(
    path: Path, size: int, rng: np.random.Generator, progress: Progress, task: TaskID
) -> None:
    """A valid safetensors file holding one random U8 tensor of ``size`` bytes."""
    header = json.dumps(
        {"weight": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        left = size
        while left:
            block = min(left, _BLOCK)
            handle.write(rng.bytes(block))
            left -= block
            progress.advance(task, block)


def make_expert(directory: Path, files: int, file_size: int) -> int:
    """Writes the expert directory; returns its total size in bytes."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with Progress(transient=True) as progress:
        task = progress.add_task("writing expert", total=files * file_size)
        for index in range(1, files + 1):
            name = f"model-{index:05d}-of-{files:05d}.safetensors"
            write_safetensors(directory / name, file_size, rng, progress, task)
    (directory / "config.json").write_text('{"model_type": "llama"}\n')
    return sum(p.stat().st_size for p in directory.iterdir())


def make_site_identity(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway federation CA and site certificate: (key, certificate, CA) PEM paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, site_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "benchmark CA")])
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))

    def issue(subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=subject,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=validity[0],
            not_valid_after=validity[1],
        ).add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier("spiffe://bench/site/a")]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256())

    paths = directory / "site.key", directory / "site.pem", directory / "ca.pem"
    paths[0].write_bytes(
        site_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    site_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-a")])
    paths[1].write_bytes(issue(site_name, site_key, False).public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(issue(ca_name, ca_key, True).public_bytes(serialization.Encoding.PEM))
    return paths


def timed(work: Callable[[], object]) -> float:
    """Seconds one run of ``work`` takes."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def openssl_dgst(files: list[Path], cores: int) -> None:
    """``openssl dgst -sha256`` over ``files``, one process per core at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=cores) as pool:
        runs = pool.map(
            lambda f: subprocess.run(
                ["openssl", "dgst", "-sha256", str(f)], check=True, capture_output=True
            ),
            files,
        )
        list(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4, help="safetensors files (default 4)")
    parser.add_argument("--gib-per-file", type=float, default=1.0, help="size of each (GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated directory")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    if shutil.which("openssl") is None:
        print("openssl not found on PATH: it is the anchor of this benchmark", file=sys.stderr)
        return 2

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-signing-", dir=args.dir))
    try:
        expert = work / "expert-0"
        total = make_expert(expert, args.files, int(args.gib_per_file * (1 << 30)))
        key, certificate, ca = make_site_identity(work)
        shards = sorted(expert.glob("*.safetensors"))
        hashed = sum(p.stat().st_size for p in shards)
        ca_pem = ca.read_bytes()
        now = datetime.datetime.now(datetime.UTC)
        run = TrainingRun(
            expert_index=0,
            assignment_digest="0" * 64,
            recipe_digest="1" * 64,
            base_model_digest="2" * 64,
            shard_manifest_digest="3" * 64,
            atoll_version="bench",
            invocation_id="benchmark",
            started_on=now,
            finished_on=now,
            steps=0,
            final_loss=0.0,
        )

        def sign() -> None:
            sign_expert(expert, run, private_key_path=key, certificate_path=certificate, ca_path=ca)

        def model_signing_hash() -> None:
            from model_signing import hashing

            hashing.Config().set_ignored_paths(
                paths=["model.sig", "provenance.sigstore.json"]
            ).hash(expert)

        candidates: dict[str, Callable[[], object]] = {
            "sign": sign,
            "verify": lambda: verify_expert(expert, trusted_ca_pem=ca_pem),
            "model_signing hash": model_signing_hash,
        }
        openssl_dgst(shards, cores)  # warm the page cache
        # Side by side: each round times the anchor next to every candidate, so a busy
        # machine slows both sides of a ratio; the median ratio over rounds is reported.
        anchors: list[float] = []
        seconds: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in track(range(args.repeat), description="measuring", transient=True):
            for name, candidate in candidates.items():
                anchors.append(timed(lambda: openssl_dgst(shards, cores)))
                seconds[name].append(timed(candidate))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    anchor = min(anchors)
    anchor_rate = hashed / anchor
    report = {
        "bytes": total,
        "files": args.files,
        "cores": cores,
        "rounds": args.repeat,
        "anchor": {
            "name": "openssl dgst -sha256, one process per core",
            "best_seconds": anchor,
            "gib_per_s": anchor_rate / (1 << 30),
        },
        "runs": {
            name: {
                "best_seconds": min(times),
                "gib_per_s": total / min(times) / (1 << 30),
                # anchor i was timed just before run i of this candidate
                "ratio_to_anchor": statistics.median(
                    (total / t) / (hashed / a)
                    for t, a in zip(times, anchors[index :: len(candidates)], strict=True)
                ),
            }
            for index, (name, times) in enumerate(seconds.items())
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{total / (1 << 30):.2f} GiB in {args.files} files, {cores} cores; anchor "
            f"openssl dgst -sha256: best {anchor:.2f} s ({anchor_rate / (1 << 30):.2f} GiB/s), "
            f"{args.repeat} rounds"
        )
        print(f"{'':20} {'best s':>8} {'GiB/s':>7} {'median ratio':>13}")
        for name, row in report["runs"].items():
            print(
                f"{name:20} {row['best_seconds']:8.2f} {row['gib_per_s']:7.2f} "
                f"{row['ratio_to_anchor']:13.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
