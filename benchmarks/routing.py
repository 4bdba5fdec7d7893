"""Routed ensemble vs. one dense model of the same architecture, on the same batch.

Builds a K-expert ensemble directory of tiny LLaVA experts (the test suite's builder,
``tests/ensemble_runtime/builders.py``) at two sizes -- ``tiny`` (``configs/tiny-cpu.yaml``)
and ``small`` (hidden 256, 4 layers, 64 px images) -- and times, side by side and alternating
so that drift cancels:

* dense: expert 0's own ``generate`` on the whole batch (the anchor);
* top-1: ``RoutedEnsemble.generate`` with top-k 1 (the batch grouped by expert, one batched
  ``generate`` per group), and the router's share of that time (image features + routing);
* top-2: lock-step mixing of two experts with their own KV caches.

Greedy, fixed prompt, ``--new-tokens`` per sample; rates count the tokens actually generated
(up to end-of-sequence). Prints tokens/s and the ratios against dense, best of ``--repeats``:
top-1/dense (target >= 0.95), router share (the target under 1% is for a router that shares
the expert's CLIP tower; here the tiny open_clip router is a separate model), top-2/dense cost
(target <= 2.1x).

    .venv/bin/python benchmarks/routing.py [--sizes tiny small] [--batch 8] [--experts 2]
        [--new-tokens 32] [--repeats 5] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from ensemble_runtime.builders import (  # type: ignore[import-not-found]  # noqa: E402
    KINDS,
    build_ensemble,
    picture,
)

from ensemble.runtime import RoutedEnsemble  # noqa: E402

SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_layers": 4,
        "num_heads": 8,
        "num_key_value_heads": 4,
        "vision_hidden_size": 128,
        "vision_intermediate_size": 512,
        "vision_num_layers": 4,
        "vision_num_heads": 4,
        "image_size": 64,
        "patch_size": 8,
    },
}
PROMPT = "Describe the picture in detail."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], int], device: torch.device) -> tuple[float, int]:
    _sync(device)
    start = time.perf_counter()
    tokens = fn()
    _sync(device)
    return time.perf_counter() - start, tokens


def bench_size(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    root = build_ensemble(
        workdir / name,
        seeds=tuple(range(11, 11 + args.experts)),
        size=SIZES[name],
        scratch=workdir / f"{name}-pictures",
    )
    ensemble = RoutedEnsemble.from_pretrained(root, device=args.device)
    device = ensemble.device
    kinds = list(KINDS)
    images = [picture(kinds[i % len(kinds)], i % 5) for i in range(args.batch)]
    prompts = [PROMPT] * args.batch
    dense_model = ensemble.experts.model(0)
    eos = ensemble.tokenizer.eos_token_id

    def dense() -> int:
        inputs = ensemble.encode_inputs(images, prompts)
        with torch.inference_mode():
            output = dense_model.generate(  # type: ignore[operator]
                **inputs, max_new_tokens=args.new_tokens, do_sample=False
            )
        rows = output[:, inputs["input_ids"].shape[1] :].tolist()
        return sum(row.index(eos) if eos in row else len(row) for row in rows)

    def routed(top_k: int) -> Callable[[], int]:
        def run() -> int:
            result = ensemble.generate_tokens(images, prompts, args.new_tokens, top_k=top_k)
            return sum(len(ids) for ids in result.token_ids)

        return run

    def router() -> int:
        ensemble.route_images(images)
        return 0

    runs: dict[str, list[tuple[float, int]]] = {m: [] for m in ("dense", "top1", "top2", "router")}
    modes = {
        "dense": dense,
        "top1": routed(1),
        "top2": routed(min(2, args.experts)),
        "router": router,
    }
    for warm_up in modes.values():  # allocator, kernels, lazy imports
        warm_up()
    for repeat in range(args.repeats):
        order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
        for mode_name in order:
            runs[mode_name].append(_timed(modes[mode_name], device))
    rate = {m: max(t / s for s, t in runs[m]) for m in ("dense", "top1", "top2")}
    best_router = min(s for s, _ in runs["router"])
    best_top1 = min(s for s, _ in runs["top1"])
    return {
        "size": name,
        "experts": args.experts,
        "batch": args.batch,
        "groups_top1": len({int(e) for e in ensemble.route_images(images).experts[:, 0]}),
        "tokens_per_s": rate,
        "top1_vs_dense": rate["top1"] / rate["dense"],
        "router_share_of_top1": best_router / best_top1,
        "top2_cost_vs_dense": rate["dense"] / rate["top2"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        reports = [bench_size(name, args, Path(scratch)) for name in args.sizes]
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    print(
        f"device {args.device}, batch {args.batch}, {args.experts} experts, {args.new_tokens} new tokens"
    )
    for r in reports:
        rates = r["tokens_per_s"]
        print(
            f"{r['size']:>6}: dense {rates['dense']:8.1f} tok/s | top-1 {rates['top1']:8.1f} tok/s "
            f"({r['groups_top1']} groups), ratio {r['top1_vs_dense']:.3f} (target >= 0.95) | "
            f"router share {100 * r['router_share_of_top1']:.2f}% | top-2 {rates['top2']:8.1f} "
            f"tok/s, cost {r['top2_cost_vs_dense']:.2f}x dense (target <= 2.1)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
