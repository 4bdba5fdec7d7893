"""The decentralisation theorem, checked exactly with tabular next-token experts.

:mod:`ensemble.tabular_experts` fits one tabular expert per cluster and the centralised model
on all the data, and measures what each router's mixture costs against the centralised model
(the posterior-routed mixture costs nothing: ``docs/theory.md`` has the proof). This module
draws synthetic datasets whose clusters the image separates more or less well and tabulates
that cost for every router.

Run ``python -m ensemble.theory`` to print the KL gaps on the synthetic datasets of
``GAP_DATASETS`` (``--json`` for a machine-readable report).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

import numpy as np

from ensemble.tabular_experts import (
    END_OF_SEQUENCE,
    Router,
    TabularModel,
    exact_log,
    fit_partition,
    measure_gap,
    posterior_weights,
    time_independent_weights,
    top1,
    uniform_weights,
)

__all__ = ["GAP_DATASETS", "ROUTERS", "SyntheticDataset", "gap_table", "main", "make_dataset"]


# --- synthetic datasets ------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticDataset:
    """Sequences ``(image, text...)`` and the cluster each belongs to.

    Attributes:
        name: What the dataset shows.
        sequences: Token 0 is the image id (or ``text_only_token``); the rest is text.
        cluster_ids: The partition, one id per sequence.
        num_clusters: K.
    """

    name: str
    sequences: list[tuple[int, ...]]
    cluster_ids: list[int]
    num_clusters: int


def make_dataset(
    name: str,
    *,
    image_overlap: float,
    text_only_share: float = 0.0,
    num_sequences: int = 4000,
    num_clusters: int = 4,
    num_images: int = 16,
    text_vocabulary: int = 4,
    text_length: int = 3,
    seed: int = 0,
) -> SyntheticDataset:
    """Draws a dataset whose clusters are more or less separable by the image.

    Each cluster is a topic with its own text language (a Markov chain whose first token
    depends on the image). A sequence of topic k shows one of topic k's own images (images
    ``i`` with ``i % K == k``) with probability ``1 - image_overlap``, else any image
    uniformly. ``image_overlap = 0``: the partition is a function of the image, as in the
    paper's image clustering. ``image_overlap = 1``: the image says nothing about the cluster.
    A ``text_only_share`` of the sequences have no image (one shared token) and a uniformly
    random cluster, as the paper splits its text-only samples.

    Returns:
        The dataset; image ids are ``0..num_images-1``, text tokens follow, and the
        text-only token is the last id.
    """
    rng = np.random.default_rng(seed)
    text_tokens = np.arange(num_images, num_images + text_vocabulary)
    text_only_token = num_images + text_vocabulary
    # Sparse Dirichlet draws make the topics' languages clearly different.
    first_token = rng.dirichlet(np.full(text_vocabulary, 0.3), size=(num_clusters, num_images + 1))
    transition = rng.dirichlet(np.full(text_vocabulary, 0.3), size=(num_clusters, text_vocabulary))
    own_images = [np.arange(k, num_images, num_clusters) for k in range(num_clusters)]
    sequences: list[tuple[int, ...]] = []
    cluster_ids: list[int] = []
    for _ in range(num_sequences):
        cluster = int(rng.integers(num_clusters))
        if rng.random() < text_only_share:
            image, image_row = text_only_token, num_images
        else:
            pool = np.arange(num_images) if rng.random() < image_overlap else own_images[cluster]
            image = image_row = int(rng.choice(pool))
        state = int(rng.choice(text_vocabulary, p=first_token[cluster, image_row]))
        text = [state]
        for _ in range(text_length - 1):
            state = int(rng.choice(text_vocabulary, p=transition[cluster, state]))
            text.append(state)
        sequences.append((image, *(int(text_tokens[s]) for s in text)))
        cluster_ids.append(cluster)
    return SyntheticDataset(name, sequences, cluster_ids, num_clusters)


GAP_DATASETS: Final[tuple[tuple[str, float, float], ...]] = (
    # (name, image_overlap, text_only_share)
    ("separable by image", 0.0, 0.0),
    ("separable + 10% text-only", 0.0, 0.1),
    ("image overlap 0.2", 0.2, 0.0),
    ("image overlap 0.6", 0.6, 0.0),
    ("image uninformative", 1.0, 0.0),
)

ROUTERS: Final[dict[str, Router]] = {
    "posterior (exact)": posterior_weights,
    "time-independent p(S_k|c)": time_independent_weights,
    "top-1 of p(S_k|c)": top1(time_independent_weights),
    "top-1 of posterior": top1(posterior_weights),
    "uniform 1/K": uniform_weights,
}


def _separability(dataset: SyntheticDataset, experts: Sequence[TabularModel]) -> float:
    # E_c[max_k p(S_k | c)]: 1 when the image pins the cluster, 1/K when it says nothing.
    images = Counter(s[0] for s in dataset.sequences)
    total = sum(images.values())
    return sum(
        count / total * float(max(posterior_weights(experts, (c,)))) for c, count in images.items()
    )


def _entropy_per_token(sequences: Sequence[Sequence[int]], centralised: TabularModel) -> float:
    # H(text | image) of the data in nats per predicted token: the scale a KL gap compares to.
    data = Counter((*s, END_OF_SEQUENCE) for s in sequences)
    total = sum(data.values())
    nats = sum(
        count / total * -exact_log(Fraction(count, centralised.prefix_counts[s[:1]]))
        for s, count in data.items()
    )
    return nats / (sum(count * (len(s) - 1) for s, count in data.items()) / total)


def gap_table(seed: int = 0) -> list[dict[str, object]]:
    """Measures every router of ``ROUTERS`` on every dataset of ``GAP_DATASETS``."""
    rows: list[dict[str, object]] = []
    for name, overlap, text_only in GAP_DATASETS:
        dataset = make_dataset(name, image_overlap=overlap, text_only_share=text_only, seed=seed)
        centralised, experts = fit_partition(
            dataset.sequences, dataset.cluster_ids, dataset.num_clusters
        )
        separability = _separability(dataset, experts)
        entropy = _entropy_per_token(dataset.sequences, centralised)
        for router_name, router in ROUTERS.items():
            report = measure_gap(dataset.sequences, centralised, experts, router)
            rows.append(
                {
                    "dataset": name,
                    "separability": separability,
                    "entropy_per_token": entropy,
                    "router": router_name,
                    "kl_per_token": report.kl_per_token,
                    "total_variation": report.total_variation,
                    "zero_probability_mass": report.zero_probability_mass,
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the gap table (markdown, or JSON with ``--json``)."""
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.theory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic datasets")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = gap_table(args.seed)
    if args.json:
        # JSON has no infinity; a mixture that drops training data has KL "inf".
        print(
            json.dumps(
                [{k: ("inf" if v == math.inf else v) for k, v in r.items()} for r in rows], indent=2
            )
        )
        return 0
    print(
        "| dataset | E_c max_k p(S_k \\| c) | H(text \\| c) nats/token | router "
        "| KL nats/token | TV | data at p=0 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kl = r["kl_per_token"]
        assert isinstance(kl, float)
        # Router names hold "|", which would split a markdown cell.
        router = str(r["router"]).replace("|", "\\|")
        print(
            f"| {r['dataset']} | {r['separability']:.3f} | {r['entropy_per_token']:.3f} | {router} "
            f"| {'∞' if kl == math.inf else f'{kl:.4f}'} | {r['total_variation']:.4f} "
            f"| {r['zero_probability_mass']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
