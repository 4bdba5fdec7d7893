"""Run with the Flower integration's Python (not Atoll's): writes the rows as a parquet file,
loads it through flwr-datasets' FederatedDataset offline with AtollPartitioner (clustering, and
from an existing plan) and prints each partition's row ids as JSON.

Usage: python partitions.py ROWS.json OUT_DIR COORDINATOR PLAN_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from atoll_flower.partitioner import AtollPartitioner
from datasets import Dataset, Features, Image, Sequence, Value
from flwr_datasets import FederatedDataset

# The features are made up; the plan names an encoder that is not on this machine, so Atoll
# records it unchecked (as for features computed at another site).
ENCODER = "hf:/models/clip-vit-large-patch14-336"


def main() -> None:
    rows_file, out, coordinator, plan = sys.argv[1:5]
    rows = json.loads(Path(rows_file).read_text())
    features = Features(
        {
            "id": Value("string"),
            "image": Image(),
            "text": Value("string"),
            "clip": Sequence(Value("float32")),
        }
    )
    table = Dataset.from_dict(
        {
            "id": [r["id"] for r in rows],
            # The image bytes themselves: the parquet file alone is the data set.
            "image": [
                None if r["image"] is None else {"bytes": Path(r["image"]).read_bytes()}
                for r in rows
            ],
            "text": [r["text"] for r in rows],
            "clip": [r["clip"] for r in rows],
        },
        features=features,
    )
    parquet = Path(out) / "rows.parquet"
    table.to_parquet(str(parquet))
    result = {}
    for name, partitioner in (
        (
            "clustered",
            AtollPartitioner(2, "clip", encoder=ENCODER, seed=0, coordinator=coordinator),
        ),
        ("from_plan", AtollPartitioner.from_plan(plan, id_column="id")),
    ):
        fds = FederatedDataset(
            dataset="parquet",
            data_files=str(parquet),
            partitioners={"train": partitioner},
            shuffle=False,
        )
        result[name] = [
            list(fds.load_partition(k)["id"]) for k in range(partitioner.num_partitions)
        ]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
