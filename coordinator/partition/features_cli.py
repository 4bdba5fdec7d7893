"""``coordinator features``: CLIP features of a data set's images, computed where the images
and GPUs are, for ``coordinator partition --features`` elsewhere.

It needs no state directory: run it on any machine with the images (a GPU node for 665k
images), copy the ``.npz`` to the coordinator. The file holds ``ids`` (the image paths as the
data set writes them), ``features`` (unit rows) and ``encoder`` (the spec given here), so the
plan names the encoder the router must run; the coordinator recomputes a sample of the
features when that spec loads there (pass ``--feature-encoder`` to partition when the encoder
lives at another path on the coordinator)::

    coordinator features --dataset llava_v1_5_mix665k.json --image-root /data/images \\
        --encoder hf:/models/clip-vit-large-patch14-336 --out features.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``features`` flags to ``parser``."""
    parser.add_argument("--dataset", type=Path, required=True, help="LLaVA JSON/JSONL or meta")
    parser.add_argument("--image-root", type=Path, required=True, help="where images are")
    parser.add_argument("--encoder", required=True, help="open_clip:MODEL[:PRETRAINED] or hf:PATH")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("--device", help="torch device (default: cuda if any)")
    parser.add_argument("--json", action="store_true", help="print a summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Encodes every distinct image reference and writes the .npz; returns 0."""
    import numpy as np

    from coordinator.partition.cli import _progress
    from coordinator.partition.dataset import load_dataset, resolve_image
    from protocol.errors import InvalidArgument, NotFound
    from protocol.feature_model import load_encoder

    if not args.image_root.is_dir():
        raise NotFound(f"--image-root {args.image_root}: no such directory")
    references = sorted(set(load_dataset(args.dataset).image_references))
    if not references:
        raise InvalidArgument(f"--dataset {args.dataset}: no images to encode")
    encoder = load_encoder(args.encoder, device=args.device)
    paths = [resolve_image(args.image_root, ref) for ref in references]
    missing = [ref for ref, path in zip(references, paths, strict=True) if not path.is_file()]
    if missing:
        raise NotFound(
            f"{len(missing)} image(s) of {args.dataset} are missing under {args.image_root}, "
            f"e.g. {missing[:3]}"
        )
    with _progress(enabled=not args.json) as reporter:
        features, failures = encoder.encode(
            paths,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=reporter("encoding images", len(paths)),
        )
    if failures:
        shown = ", ".join(f"{f.path} ({f.reason})" for f in failures[:3])
        raise InvalidArgument(f"{len(failures)} image(s) could not be decoded: {shown}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial.npz")
    np.savez(partial, ids=np.array(references), features=features, encoder=np.array(args.encoder))
    partial.replace(args.out)
    summary = {"out": str(args.out), "images": len(references), "dim": int(features.shape[1])}
    summary["encoder"] = args.encoder
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"wrote {args.out}: {len(references)} images x {features.shape[1]}, {args.encoder}")
    return 0
