"""Feature centring (``coordinator partition --center``) against plain cosines, on the demo data.

The authors' code subtracts the data set's mean CLIP feature before the cosine. This measures
what that does on the demo's data set (``scripts/demo.py``: 300 ``shapes`` and 300 ``charts``
pictures, 50 held-out pictures per domain) with the demo's encoder, side by side, the
uncentred partition as the anchor:

* purity: the share of each cluster's images from its majority domain (1.0 = the clusters
  are the domains);
* held-out agreement: held-out pictures routed (top-1) to the cluster whose majority domain
  is theirs;
* confidence: the mean top-1 router probability of held-out pictures at tau = 50 (the
  demo's), and the mean cosine margin between the best and second centroid (how far tau must
  sharpen before routing is decisive).

    .venv/bin/python benchmarks/centering.py [--encoder open_clip:atoll-tiny-clip] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from demo import FULL, write_dataset  # type: ignore[import-not-found]  # noqa: E402

from coordinator.partition.kmeans import balanced_spherical_kmeans  # noqa: E402
from ensemble.router import Router  # noqa: E402
from protocol.feature_model import load_encoder  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(
    train: np.ndarray,
    train_domains: list[str],
    held: np.ndarray,
    held_domains: list[str],
    center: bool,
    seed: int,
) -> dict[str, float]:
    mean = train.mean(axis=0) if center else None
    fitted = _unit(train - mean) if mean is not None else train
    result = balanced_spherical_kmeans(fitted.astype(np.float32), 2, seed=seed, max_iter=50)
    majority, purity = [], []
    for k in range(2):
        members = [d for d, label in zip(train_domains, result.labels, strict=True) if label == k]
        top = max(set(members), key=members.count)
        majority.append(top)
        purity.append(members.count(top) / len(members))
    router = Router(
        torch.from_numpy(result.centroids),
        tau=50.0,
        top_k=1,
        center=None if mean is None else torch.from_numpy(mean.astype(np.float32)),
    )
    cosines = router.cosines(torch.from_numpy(held))
    probabilities = router.probabilities(torch.from_numpy(held))
    routed = cosines.argmax(-1).tolist()
    agreement = np.mean([majority[k] == d for k, d in zip(routed, held_domains, strict=True)])
    ordered = cosines.sort(-1, descending=True).values
    return {
        "purity": float(np.mean(purity)),
        "held_out_agreement": float(agreement),
        "top1_probability_tau50": float(probabilities.max(-1).values.mean()),
        "cosine_margin": float((ordered[:, 0] - ordered[:, 1]).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="open_clip:atoll-tiny-clip")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        write_dataset(out, FULL)
        samples = json.loads((out / "train.json").read_text())
        held_samples = json.loads((out / "eval.json").read_text())
        encoder = load_encoder(args.encoder, device="cpu")

        def encode(records: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
            images = sorted({r["image"] for r in records if "image" in r})
            features, failures = encoder.encode([out / "images" / i for i in images])
            assert not failures
            return features, [i.split("/", 1)[0] for i in images]

        train, train_domains = encode(samples)
        held, held_domains = encode(held_samples)
    rows: dict[str, dict[str, float]] = {}
    for center in (False, True):
        runs = [
            measure(train, train_domains, held, held_domains, center, seed) for seed in args.seeds
        ]
        rows["centred" if center else "plain (anchor)"] = {
            key: float(np.mean([r[key] for r in runs])) for key in runs[0]
        }
    norm = float(np.linalg.norm(train.mean(axis=0)))
    if args.json:
        print(json.dumps({"mean_feature_norm": norm, "rows": rows}, indent=1))
        return
    print(f"{args.encoder}: {len(train)} training and {len(held)} held-out pictures, ", end="")
    print(f"|mean feature| = {norm:.3f}, seeds {args.seeds}")
    keys = list(next(iter(rows.values())))
    print(f"{'':16}" + "".join(f"{k:>24}" for k in keys))
    for name, row in rows.items():
        print(f"{name:16}" + "".join(f"{row[k]:>24.4f}" for k in keys))
    anchor, centred = rows["plain (anchor)"], rows["centred"]
    ratios = "".join(
        f"{centred[k] / anchor[k]:>24.3f}" if anchor[k] else f"{'-':>24}" for k in keys
    )
    print(f"{'centred / plain':16}" + ratios)


if __name__ == "__main__":
    main()
