"""Routed ensemble vs. one dense model of the same architecture, on the same requests.

Builds K-expert ensemble directories of tiny LLaVA experts (the test suite's builder,
``tests/ensemble_runtime/builders.py``) at two sizes -- ``tiny`` (``configs/tiny-cpu.yaml``)
and ``small`` (hidden 256, 4 layers, 64 px images) -- in two router set-ups: ``shared`` (the
experts keep one frozen CLIP vision tower, as LLaVA trains, and the plan's encoder is CLIP on
that tower, so the router shares it) and ``separate`` (the plan's tiny open_clip model, a
second encoder pass). The requests (``--requests``, default 512) are pictures of random kinds,
so the split between experts is what chance gives. Each ``--batch`` size B (default 8 and 64)
is measured on its own; side by side and alternating, so that drift cancels, it times:

* dense: expert 0's own ``generate`` on each batch of B requests, with the preprocessing
  (chat template, processor) and decoding a user of one dense model does (the anchor);
* top-1: one ``RoutedEnsemble.generate_tokens(requests, batch_size=B)`` call with the shared
  router -- as ``atoll eval`` runs a window of questions: each expert's requests fill batches
  of their own, and only the remainders share a (stacked) batch (``ensemble.scheduling``);
  ``top1_separate``: the same with the open_clip router; ``top1_lora``: the same with LoRA
  experts (rank 4, attention and MLP projections) over one base, each batch of one expert
  run with its adapter active, against ``dense_lora``: the base with expert 0's adapter, as
  one LoRA-tuned model runs unmerged (the adapters' own cost is in that anchor, not in the
  ratio; the row also prints it against dense);
* top-1, each batch split: ``generate_tokens`` on each batch of B as it comes, its rows
  grouped by expert into one stacked call per step (what a caller who hands the ensemble
  one batch at a time gets);
* top-2: lock-step mixing of two experts with their own KV caches, B requests a call;
* the router's own work: with the shared tower, what routing adds to the pass the experts
  need anyway (projection of the pooled CLS token, cosine, softmax, top-k); with the
  separate router, its whole encoder pass and routing.

Setting 1 as ``coordinator assemble`` builds it (``--assembled DIR``, or ``--assembled build``
to run the paper's §5.1 setting through the real commands first, as
``tests/settings/test_llava_shared_tower.py`` does: LoRA experts trained by two sites, the
router the ``hf:`` CLIP that is their tower): top-1 against one LoRA model (the base with
expert 0's adapter), the router's share of top-1 time, and the tower passes per batch
(target: one).

Greedy, fixed prompt, ``--new-tokens`` per sample; rates count the tokens actually generated
(up to end-of-sequence). Prints tokens/s and the ratios against dense, best of ``--repeats``:
top-1/dense (target >= 0.95), router share of top-1 time with the shared encoder (target
under 1%), top-2/dense cost (target <= 2.1x). ``--clock cpu`` times process CPU time instead
of wall time: with ``--threads 1`` it counts the work done and not the waiting, which is what
a machine shared with other jobs can measure.

Why the schedule matters: full experts share no weights, so a batch split between two
experts reads both experts' weights at every decoding step where dense reads one set. While
decoding is bound by reading weights (small batches on a CPU whose caches do not hold the
model; the same holds for HBM on a GPU), a split batch costs up to twice a dense one per
token -- the "each batch split" row at batch 8. Filling batches per expert leaves about one
batch in two experts' remainders per window, so top-1 approaches dense as the window grows.

    .venv/bin/python benchmarks/routing.py [--sizes tiny small] [--batch 8 64] [--experts 2]
        [--requests 512] [--new-tokens 32] [--repeats 5] [--device cpu|cuda] [--threads N]
        [--clock wall|cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
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
from ensemble.scheduling import batches, slices  # noqa: E402

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


def _timed(
    fn: Callable[[], int], device: torch.device, clock: Callable[[], float]
) -> tuple[float, int]:
    _sync(device)
    start = clock()
    tokens = fn()
    _sync(device)
    return clock() - start, tokens


def bench_size(name: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """One report per batch size in ``args.batch``, from one pair of ensembles."""
    seeds = tuple(range(11, 11 + args.experts))
    ensembles = {
        kind: RoutedEnsemble.from_pretrained(
            build_ensemble(
                workdir / f"{name}-{kind}",
                seeds=seeds,
                size=SIZES[name],
                scratch=workdir / f"{name}-pictures",
                shared_encoder=kind != "separate",
                lora=kind == "lora",
            ),
            device=args.device,
        )
        for kind in ("shared", "separate", "lora")
    }
    return [bench_batch(name, ensembles, batch, args) for batch in args.batch]


def bench_batch(
    name: str, ensembles: dict[str, RoutedEnsemble], batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    ensemble, separate = ensembles["shared"], ensembles["separate"]
    shared_tower = ensemble.shared_tower
    assert shared_tower is not None, "the shared-encoder ensemble did not share its tower"
    device = ensemble.device
    kinds = list(KINDS)
    # Requests of random kinds, so the split between experts is what chance gives.
    draw = random.Random(f"{name}-{batch}")
    requests = -(-args.requests // batch) * batch  # whole batches for the dense model
    images = [picture(draw.choice(kinds), draw.randrange(5)) for _ in range(requests)]
    prompts = [PROMPT] * requests
    chunks = slices(requests, batch)
    tokenizer = ensemble.tokenizer
    eos = tokenizer.eos_token_id

    def dense_of(owner: RoutedEnsemble) -> Callable[[], int]:
        def run() -> int:
            model = owner.experts.model(0)  # a LoRA ensemble's base with expert 0's adapter
            tokens = 0
            for chunk in chunks:
                inputs = owner.encode_inputs(images[chunk], prompts[chunk])
                with torch.inference_mode():
                    output = model.generate(  # type: ignore[operator]
                        **inputs,
                        max_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                rows = [
                    row[: row.index(eos)] if eos in row else row
                    for row in output[:, inputs["input_ids"].shape[1] :].tolist()
                ]
                tokenizer.batch_decode(rows, skip_special_tokens=True)
                tokens += sum(len(row) for row in rows)
            return tokens

        return run

    def routed(model: RoutedEnsemble, top_k: int) -> Callable[[], int]:
        def run() -> int:
            result = model.generate_tokens(
                images, prompts, args.new_tokens, top_k=top_k, batch_size=batch * top_k
            )
            return sum(len(ids) for ids in result.token_ids)

        return run

    def split() -> int:
        tokens = 0
        for chunk in chunks:
            result = ensemble.generate_tokens(images[chunk], prompts[chunk], args.new_tokens)
            tokens += sum(len(ids) for ids in result.token_ids)
        return tokens

    pixels = ensemble.encode_inputs(images, prompts)["pixel_values"]
    _, tower_output = shared_tower.encode(pixels, batch)
    pooled = tower_output.pooler_output

    def router_shared() -> int:
        with torch.inference_mode():
            features = shared_tower.projection(pooled).float()
            ensemble.router.route(torch.nn.functional.normalize(features, dim=-1))
        return 0

    def router_separate() -> int:
        separate.route_images(images, batch_size=batch)
        return 0

    modes: dict[str, Callable[[], int]] = {
        "dense": dense_of(ensemble),
        "dense_lora": dense_of(ensembles["lora"]),
        "top1": routed(ensemble, 1),
        "top1_split": split,
        "top1_separate": routed(separate, 1),
        "top1_lora": routed(ensembles["lora"], 1),
        "top2": routed(ensemble, min(2, args.experts)),
        "router_shared": router_shared,
        "router_separate": router_separate,
    }
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    runs: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}
    for warm_up in modes.values():  # allocator, kernels, lazy imports
        warm_up()
    for repeat in range(args.repeats):
        order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
        for mode_name in order:
            runs[mode_name].append(_timed(modes[mode_name], device, clock))
    generating = ("dense", "top1", "top1_split", "top1_separate", "dense_lora", "top1_lora")
    generating += ("top2",)
    rate = {m: max(t / s for s, t in runs[m]) for m in generating}
    best = {m: min(s for s, _ in runs[m]) for m in modes}
    chosen = [int(e) for e in ensemble.route_images(images, batch_size=batch).experts[:, 0]]
    calls = batches([(e,) for e in chosen], batch)
    return {
        "size": name,
        "experts": args.experts,
        "batch": batch,
        "requests": requests,
        "clock": args.clock,
        "per_expert": [chosen.count(e) for e in range(args.experts)],
        "top1_calls": len(calls),
        "top1_shared_calls": sum(len({chosen[i] for i in call}) > 1 for call in calls),
        "tokens": {m: runs[m][0][1] for m in generating},
        "tokens_per_s": rate,
        "top1_vs_dense": rate["top1"] / rate["dense"],
        "top1_split_vs_dense": rate["top1_split"] / rate["dense"],
        "top1_separate_vs_dense": rate["top1_separate"] / rate["dense"],
        "top1_lora_vs_dense_lora": rate["top1_lora"] / rate["dense_lora"],
        "dense_lora_vs_dense": rate["dense_lora"] / rate["dense"],
        "router_share_of_top1": best["router_shared"] / best["top1"],
        "separate_router_share_of_top1": best["router_separate"] / best["top1_separate"],
        "top2_cost_vs_dense": rate["dense"] / rate["top2"],
    }


def bench_assembled(directory: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Setting 1 from an assembled ensemble directory: one report per batch size."""
    ensemble = RoutedEnsemble.from_pretrained(directory, device=args.device)
    shared_tower = ensemble.shared_tower
    assert shared_tower is not None, ensemble.shared_tower_reason
    pictures = sorted(p for p in directory.parent.parent.rglob("eval-*.png"))
    if not pictures:  # an ensemble without its federation's data: the builder's pictures
        pictures = [picture(kind, v) for kind in KINDS for v in range(5)]
    return [_assembled_batch(ensemble, pictures, batch, args) for batch in args.batch]


def _assembled_batch(
    ensemble: RoutedEnsemble, pictures: list[Any], batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    from ensemble_runtime.test_batching import counting_forwards  # type: ignore[import-not-found]

    shared_tower = ensemble.shared_tower
    assert shared_tower is not None
    device = ensemble.device
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    draw = random.Random(f"assembled-{batch}")
    requests = -(-args.requests // batch) * batch
    images = [open_or_keep(draw.choice(pictures)) for _ in range(requests)]
    prompts = [PROMPT] * requests
    tokenizer, eos = ensemble.tokenizer, ensemble.tokenizer.eos_token_id

    def dense() -> int:
        model = ensemble.experts.model(0)  # the base with expert 0's adapter
        tokens = 0
        for chunk in slices(requests, batch):
            inputs = ensemble.encode_inputs(images[chunk], prompts[chunk])
            with torch.inference_mode():
                output = model.generate(  # type: ignore[operator]
                    **inputs, max_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
            rows = output[:, inputs["input_ids"].shape[1] :].tolist()
            tokens += sum(len(r[: r.index(eos)] if eos in r else r) for r in rows)
        return tokens

    def top1() -> int:
        result = ensemble.generate_tokens(images, prompts, args.new_tokens, batch_size=batch)
        return sum(len(ids) for ids in result.token_ids)

    pixels = ensemble.encode_inputs(images, prompts)["pixel_values"]
    _, tower_output = shared_tower.encode(pixels, batch)

    def router() -> int:
        with torch.inference_mode():
            features = shared_tower.projection(tower_output.pooler_output).float()
            ensemble.router.route(torch.nn.functional.normalize(features, dim=-1))
        return 0

    modes = {"dense_lora": dense, "top1": top1, "router_shared": router}
    for warm_up in modes.values():
        warm_up()
    runs: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}
    for repeat in range(args.repeats):
        for mode_name in list(modes) if repeat % 2 == 0 else list(reversed(modes)):
            runs[mode_name].append(_timed(modes[mode_name], device, clock))
    # Every CLIP tower in the ensemble: the router's own and the experts'.
    towers = [ensemble.feature_model.clip.vision_model.encoder]
    towers += [tower.encoder for tower in ensemble.experts.vision_towers()]
    with counting_forwards(towers) as passes:
        top1()
    rate = {m: max(t / s for s, t in runs[m]) for m in ("dense_lora", "top1")}
    best = {m: min(s for s, _ in runs[m]) for m in modes}
    return {
        "size": "setting-1",
        "batch": batch,
        "requests": requests,
        "tokens_per_s": rate,
        "top1_vs_dense_lora": rate["top1"] / rate["dense_lora"],
        "router_share_of_top1": best["router_shared"] / best["top1"],
        "tower_passes_per_batch": sum(passes) / (requests // batch),
    }


def open_or_keep(item: Any) -> Any:
    from PIL import Image

    return Image.open(item).convert("RGB") if isinstance(item, Path) else item


def build_setting1(workdir: Path) -> Path:
    """The §5.1 setting through the real commands (the settings test's harness)."""
    from ensemble_runtime.builders import save_clip_router  # type: ignore[import-not-found]
    from settings.harness import Federation, tiny_recipe, write_data  # type: ignore[import-not-found]

    data = write_data(workdir / "data")
    federation = Federation(workdir / "federation", "llava-lora")
    federation.set_up(tiny_recipe(workdir / "llava-lora.yaml", "llava", lora=True))
    save_clip_router(workdir / "clip-tower", federation.state / "base")
    try:
        federation.partition("--dataset", str(data / "train.json"), "--image-root",
                             str(data / "images"), "--experts", "2", "--encoder",
                             f"hf:{workdir / 'clip-tower'}")  # fmt: skip
        federation.train(2, data / "images")
        _, ensemble = federation.publish()
    finally:
        federation.stop()
    return ensemble


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[8, 64],
        help="batch sizes, each measured on its own (default: 8 and 64)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=512,
        help="requests per run (rounded up to whole batches): one generate call for the ensemble",
    )
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or process CPU time (use with --threads 1 on a busy machine)",
    )
    parser.add_argument(
        "--assembled",
        metavar="DIR|build",
        help="setting 1 from an ensemble `coordinator assemble` built (`build`: build it "
        "through the real commands first); replaces the builder's sizes",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.assembled:
            directory = Path(args.assembled)
            if args.assembled == "build":
                directory = build_setting1(Path(scratch))
            reports = bench_assembled(directory, args)
        else:
            reports = [r for name in args.sizes for r in bench_size(name, args, Path(scratch))]
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    print(
        f"device {args.device}, {args.experts} experts, {args.new_tokens} new tokens, "
        f"{args.clock} clock, threads {torch.get_num_threads()}"
    )
    for r in reports:
        rates = r["tokens_per_s"]
        if r["size"] == "setting-1":
            print(
                f"setting 1 (coordinator assemble: LoRA experts, hf CLIP router = their tower) "
                f"batch {r['batch']}, {r['requests']} requests: top-1 {rates['top1']:8.1f} tok/s "
                f"vs one LoRA model {rates['dense_lora']:8.1f} tok/s, ratio "
                f"{r['top1_vs_dense_lora']:.3f} | router share {100 * r['router_share_of_top1']:.2f}% "
                f"(target < 1%) | tower passes per batch {r['tower_passes_per_batch']:.2f} "
                "(target 1)"
            )
            continue
        print(
            f"{r['size']:>6} batch {r['batch']:3d}, {r['requests']} requests "
            f"(per expert {r['per_expert']}; top-1 in {r['top1_calls']} calls, "
            f"{r['top1_shared_calls']} shared by experts)"
        )
        print(
            f"{'':>8}dense {rates['dense']:8.1f} tok/s | top-1 {rates['top1']:8.1f} tok/s, ratio "
            f"{r['top1_vs_dense']:.3f} (target >= 0.95) | router share "
            f"{100 * r['router_share_of_top1']:.2f}% (shared tower, target < 1%) | top-2 "
            f"{rates['top2']:8.1f} tok/s, cost {r['top2_cost_vs_dense']:.2f}x dense (target <= 2.1)"
        )
        print(
            f"{'':>8}each batch split between experts: top-1 {rates['top1_split']:8.1f} tok/s, "
            f"ratio {r['top1_split_vs_dense']:.3f} | separate open_clip router: top-1 "
            f"{rates['top1_separate']:8.1f} tok/s, ratio {r['top1_separate_vs_dense']:.3f}, "
            f"router share {100 * r['separate_router_share_of_top1']:.2f}%"
        )
        print(
            f"{'':>8}LoRA experts over one base: top-1 {rates['top1_lora']:8.1f} tok/s, ratio "
            f"{r['top1_lora_vs_dense_lora']:.3f} against one LoRA model (base + expert 0's "
            f"adapter, unmerged: {rates['dense_lora']:8.1f} tok/s, {r['dense_lora_vs_dense']:.3f} "
            "of dense)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
