"""``coordinator partition``: flags, progress bars, the balance table.

Example (the tiny bundled encoder, random weights, nothing downloaded)::

    coordinator partition --state fed/ --dataset data/llava.json --image-root data/images \\
        --experts 4 --encoder open_clip:atoll-tiny-clip --seed 0

Errors are raised as ``protocol.errors`` exceptions; the coordinator CLI prints them and maps
them to exit codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.state import StateDir
from protocol.progress import progress_bars

if TYPE_CHECKING:
    # Imported where used: the plan pulls in torch and open_clip, which every other
    # `coordinator` command (serve above all) must not pay for in start-up time and memory.
    from coordinator.images import ImageIndexSummary
    from coordinator.partition.plan import PartitionConfig

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``partition`` flags to ``parser``."""
    parser.add_argument("--state", type=Path, required=True, help="coordinator state directory")
    parser.add_argument(
        "--dataset",
        type=Path,
        required=True,
        help="LLaVA JSON/JSONL file or InternVL meta JSON",
    )
    parser.add_argument(
        "--image-root", type=Path, required=True, help="folder relative image paths start from"
    )
    parser.add_argument("--experts", type=int, required=True, help="K, the number of experts")
    parser.add_argument(
        "--algorithm",
        choices=("balanced", "two-stage"),
        default="balanced",
        help="balanced spherical k-means, or 1024 fine clusters then a balanced coarse step",
    )
    parser.add_argument(
        "--assign",
        choices=("balanced", "nearest"),
        default="balanced",
        help="equal clusters (default), or each image to its nearest centroid",
    )
    # Neither for a text-only data set: nothing to cluster, a random equal split.
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--encoder",
        help="open_clip:MODEL[:PRETRAINED] or hf:PATH (e.g. open_clip:atoll-tiny-clip)",
    )
    source.add_argument(
        "--features",
        type=Path,
        help="precomputed .npz with 'ids' (image paths as in the data set), 'features' and "
        "'encoder' (the spec of the encoder that computed them)",
    )
    parser.add_argument(
        "--feature-encoder",
        metavar="SPEC",
        help="with --features: the encoder that computed them, when the .npz names none "
        "(the router computes the same features; a sample is checked when it loads here)",
    )
    parser.add_argument(
        "--center",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cluster (and route) cosines around the data set's mean feature, as the authors' "
        "code does (default: on; benchmarks/centering.py measures why)",
    )
    parser.add_argument("--seed", type=int, default=0, help="clustering and text-only seed")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="drop samples whose images are missing or unreadable (reports counts)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="local tokenizer folder: count tokens per cluster"
    )
    parser.add_argument("--max-iter", type=int, default=50, help="Lloyd iteration cap")
    parser.add_argument(
        "--max-points-per-centroid",
        type=int,
        default=256,
        help="fit on a subsample of this many images per cluster (0: all); "
        "the final balanced assignment always covers every image",
    )
    parser.add_argument(
        "--fine-clusters", type=int, default=1024, help="two-stage: fine cluster count"
    )
    parser.add_argument(
        "--two-stage-balance",
        choices=("samples", "clusters"),
        default="samples",
        help="two-stage: equal images per expert, or equal fine clusters (authors' variant)",
    )
    parser.add_argument(
        "--no-serve-images",
        action="store_true",
        help="every site brings its own copy of its shard's images (default: the coordinator "
        "serves each site the images it lacks, from --image-root)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("--device", help="torch device for the encoder (default: cuda if any)")


def config_from_args(args: argparse.Namespace) -> PartitionConfig:
    """The typed configuration the flags describe."""
    from coordinator.partition.plan import PartitionConfig

    return PartitionConfig(
        dataset=args.dataset,
        image_root=args.image_root,
        experts=args.experts,
        algorithm=args.algorithm,
        assign=args.assign,
        encoder=args.encoder,
        features=args.features,
        feature_encoder=args.feature_encoder,
        center=args.center,
        seed=args.seed,
        skip_missing=args.skip_missing,
        tokenizer=args.tokenizer,
        max_iter=args.max_iter,
        max_points_per_centroid=args.max_points_per_centroid or None,
        fine_clusters=args.fine_clusters,
        two_stage_balance=args.two_stage_balance,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    """Computes and writes the plan; prints the balance table (or JSON). Returns 0."""
    from coordinator.partition.plan import make_plan, write_plan

    config = config_from_args(args)
    state = StateDir(args.state)
    state.federation()  # a clear error before any work if the directory is not initialised
    with _progress(enabled=not args.json) as reporter:
        plan = make_plan(config, state, reporter)
    result = write_plan(state, plan)
    images = _record_images(state, args, progress=not args.json)
    report: dict[str, Any] = {
        "digest": result.digest,
        "changed": result.changed,
        "directory": str(result.directory),
        "images_served": images.served,
        **plan.summary,
    }
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_table(report)
    return 0


def _record_images(state: StateDir, args: argparse.Namespace, progress: bool) -> ImageIndexSummary:
    """Records the image root the coordinator serves sites' missing images from."""
    from coordinator.images import record_images

    store = state.open_store()
    try:
        with _progress(enabled=progress) as reporter:
            return record_images(
                state,
                store,
                args.image_root,
                serve=not args.no_serve_images,
                progress=reporter("indexing images to serve", None),
            )
    finally:
        store.close()


Reporter = Callable[[str, int | None], Callable[[int], None]]


@contextmanager
def _progress(enabled: bool) -> Iterator[Reporter]:
    """Progress (:mod:`protocol.progress`) whose tasks are created on demand."""
    with progress_bars(enabled) as bars:
        yield lambda task, total: bars.add(task, total)


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    clusters = report["clusters"]
    with_tokens = any("tokens" in c for c in clusters)
    table = Table(title=f"partition plan {report['digest'][:16]}")
    for column in ("expert", "unique images", "samples", "image samples", "text-only"):
        table.add_column(column, justify="right")
    if with_tokens:
        table.add_column("tokens", justify="right")
    for c in clusters:
        row = [
            str(c["expert"]),
            str(c["unique_images"]),
            str(c["samples"]),
            str(c["image_samples"]),
            str(c["text_only"]),
        ]
        if with_tokens:
            row.append(str(c.get("tokens", "")))
        table.add_row(*row)
    console = Console()
    console.print(table)
    skipped = report["skipped"]
    if skipped["samples"]:
        console.print(
            f"skipped {skipped['samples']} sample(s): {skipped['missing_images']} missing and "
            f"{skipped['unreadable_images']} unreadable image(s)"
        )
    verb = "wrote" if report["changed"] else "unchanged:"
    console.print(f"{verb} {report['directory']} (plan {report['digest']})")
    if report["images_served"]:
        console.print("sites lacking images of their shard fetch them from this coordinator")
    else:
        console.print("images not served (--no-serve-images): every site needs its own copy")
