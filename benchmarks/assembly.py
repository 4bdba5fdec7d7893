"""Assembly's reading of the experts: one pass (copy and hash) against the passes it made
before, on the same files, side by side.

Writes K experts of N random safetensors files each (default 2 x 2 x 256 MiB) into a
temporary directory, then times, over ``--repeat`` warm-cache rounds, what assembly does with
an expert's bytes:

* anchor, the passes of the earlier assembly: copy, hash the copy, verify it (hash again),
  its manifest file list (again), the coordinator's model.sig (:func:`sign_model`: the
  ``model_signing`` library hashing the directory again) and the served artifacts' digests
  (again);
* ``one pass``: today's :func:`protocol.digests.copy_and_hash` per file, then the same four
  consumers given those digests (``known``: ``hash_model_files``, ``folder_digests``,
  ``sign_model``; the artifacts are registered with them).

Each side runs the real library functions on its own copy; each round times the anchor just
before the candidate, and the median ratio (anchor seconds / one-pass seconds) is reported,
with the bytes this process read per expert byte (``/proc/self/io``) on each side. The page
cache holds the files here, so the ratio is hashing and copying; on a cold disk the saved
reads weigh more.

    .venv/bin/python benchmarks/assembly.py [--experts 2] [--files 2] [--mib-per-file 256]
                                            [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.progress import track

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.signing import make_expert, make_site_identity  # noqa: E402
from protocol.digests import copy_and_hash, file_sha256, folder_digests, folder_files  # noqa: E402
from protocol.signing import hash_model_files, sign_model  # noqa: E402


def read_bytes() -> int:
    """Bytes this process has read (any way: read, sendfile...), from the kernel's count."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


Identity = tuple[Path, Path, Path]  # key, certificate, CA


def _sign(directory: Path, identity: Identity, known: dict[str, str] | None) -> None:
    key, certificate, ca = identity
    sign_model(
        directory, private_key_path=key, certificate_path=certificate, ca_path=ca, known=known
    )


def several_passes(sources: Path, target: Path, identity: Identity) -> None:
    """The earlier assembly's passes over each expert (and the published directory)."""
    for source in sorted(sources.iterdir()):
        copy = target / source.name
        copy.mkdir(parents=True)
        for relative, path in folder_files(source):
            shutil.copyfile(path, copy / relative)
            file_sha256(copy / relative)  # checked against the upload record
        hash_model_files(copy)  # signature check, no known digests
        folder_digests(copy)  # the manifest's file list
    _sign(target, identity, None)  # the coordinator's model.sig
    for _, path in folder_files(target):  # the served artifacts' digests
        file_sha256(path)


def one_pass(sources: Path, target: Path, identity: Identity) -> None:
    """Today's assembly: copy and hash once, every consumer given the digests."""
    known: dict[str, str] = {}
    for source in sorted(sources.iterdir()):
        copy = target / source.name
        copy.mkdir(parents=True)
        copied = {
            relative: copy_and_hash(path, copy / relative).sha256
            for relative, path in folder_files(source)
        }
        hash_model_files(copy, known=copied)
        folder_digests(copy, known=copied)
        known.update({f"{source.name}/{name}": digest for name, digest in copied.items()})
    _sign(target, identity, known)
    # The served artifacts are registered with the digests in hand: nothing to read.


def timed(
    run: Callable[[Path, Path, Identity], None], sources: Path, scratch: Path, identity: Identity
) -> tuple[float, int]:
    target = scratch / "out"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    before, start = read_bytes(), time.perf_counter()
    run(sources, target, identity)
    seconds, read = time.perf_counter() - start, read_bytes() - before
    shutil.rmtree(target)
    return seconds, read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--files", type=int, default=2, help="shards per expert")
    parser.add_argument("--mib-per-file", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="atoll-bench-assembly-", dir=args.dir))
    try:
        sources = work / "accepted"
        total = sum(
            make_expert(sources / f"expert-{k}", args.files, args.mib_per_file << 20)
            for k in range(args.experts)
        )
        identity = make_site_identity(work)
        timed(one_pass, sources, work, identity)  # warm the page cache and the imports
        anchors: list[tuple[float, int]] = []
        ours: list[tuple[float, int]] = []
        for _ in track(range(args.repeat), description="measuring", transient=True):
            anchors.append(timed(several_passes, sources, work, identity))
            ours.append(timed(one_pass, sources, work, identity))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "bytes": total,
        "experts": args.experts,
        "rounds": args.repeat,
        "anchor": {
            "name": "the earlier assembly's passes (copy, hash, verify, list, sign, serve)",
            "best_seconds": min(s for s, _ in anchors),
            "read_per_expert_byte": statistics.median(r / total for _, r in anchors),
        },
        "one_pass": {
            "best_seconds": min(s for s, _ in ours),
            "read_per_expert_byte": statistics.median(r / total for _, r in ours),
            "speedup_vs_anchor": statistics.median(
                a / o for (a, _), (o, _) in zip(anchors, ours, strict=True)
            ),
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        gib = total / (1 << 30)
        print(f"{gib:.2f} GiB in {args.experts} experts, {args.repeat} rounds, warm page cache")
        print(f"{'':32} {'best s':>8} {'GiB/s':>7} {'read / expert byte':>19}")
        rows = {"anchor: earlier passes": report["anchor"], "one pass": report["one_pass"]}
        for name, row in rows.items():
            print(
                f"{name:32} {row['best_seconds']:8.2f} {gib / row['best_seconds']:7.2f} "
                f"{row['read_per_expert_byte']:19.2f}"
            )
        speedup = report["one_pass"]["speedup_vs_anchor"]
        print(f"speed-up, median over rounds (anchor s / one-pass s): {speedup:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
