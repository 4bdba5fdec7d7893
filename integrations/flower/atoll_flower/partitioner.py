"""A flwr-datasets ``Partitioner`` that splits image-text rows as Atoll does: balanced
spherical k-means on given CLIP features, images shared by rows kept together, text-only rows
split equally with a seed.

It runs in this integration's environment (``install.sh VENV --datasets``), not Atoll's:
flwr-datasets 0.6 needs ``datasets<5``, hence ``huggingface-hub<2``, while Atoll's transformers
5 needs ``huggingface-hub>=2.4`` (``pip install --dry-run`` in Atoll's environment would
downgrade the hub under transformers). So it never imports Atoll's k-means; it asks Atoll:

* ``AtollPartitioner(num_partitions=K, features="clip", seed=0)``: writes the rows' images
  (by sha256), a LLaVA-format index and the features to a scratch folder and runs
  ``coordinator init`` + ``coordinator partition --features`` there: the partition *is*
  Atoll's plan for those rows, features and seed;
* ``AtollPartitioner.from_plan("STATE/partition")``: reads an existing plan (``plan.json``'s
  ``sample_experts``; rows in the plan's data set order, or matched by ``id_column``).

Example::

    from flwr_datasets import FederatedDataset
    partitioner = AtollPartitioner(2, features="clip", encoder="hf:/models/clip-vit-large-patch14-336")
    fds = FederatedDataset(dataset="parquet", data_files="rows.parquet",
                           partitioners={"train": partitioner}, shuffle=False)
    expert_0 = fds.load_partition(0)

``shuffle=False``: the text-only split follows row order, as Atoll's plan follows its file's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Image
from flwr_datasets.partitioner import Partitioner


class AtollPartitioner(Partitioner):
    """Partitions by Atoll's balanced clustering (see the module docstring).

    Args:
        num_partitions: K, the number of experts.
        features: a column holding each image row's feature vector (ignored on text-only
            rows), or an array with one row per dataset row.
        encoder: the spec of the encoder that computed the features (Atoll's
            ``--feature-encoder``, e.g. ``hf:/models/clip-vit-large-patch14-336``): the plan
            names it, since a router must compute the same features for new images.
        image_column: the column of images (``None`` on text-only rows).
        seed: Atoll's clustering and text-only seed.
        coordinator: path of Atoll's ``coordinator`` command.
        partition_args: more ``coordinator partition`` flags (e.g. ``["--max-iter", "20"]``).
    """

    def __init__(
        self,
        num_partitions: int,
        features: str | np.ndarray | None = None,
        *,
        encoder: str = "",
        image_column: str = "image",
        seed: int = 0,
        coordinator: str = "coordinator",
        partition_args: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions: expected >= 1, got {num_partitions}")
        self._num_partitions = num_partitions
        self._features = features
        self._encoder = encoder
        self._image_column = image_column
        self._seed = seed
        self._coordinator = coordinator
        self._partition_args = list(partition_args)
        self._plan: dict[str, Any] | None = None
        self._id_column: str | None = None
        self._experts: np.ndarray | None = None

    @classmethod
    def from_plan(cls, plan: str | Path, id_column: str | None = None) -> AtollPartitioner:
        """A partitioner that reads an existing Atoll plan (``plan.json`` or its folder)."""
        path = Path(plan)
        path = path / "plan.json" if path.is_dir() else path
        try:
            document = json.loads(path.read_text())
            experts = int(document["num_experts"])
            document["sample_experts"] = list(document["sample_experts"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not an Atoll plan.json ({error})") from None
        partitioner = cls(experts)
        partitioner._plan = {**document, "path": str(path)}
        partitioner._id_column = id_column
        return partitioner

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(f"partition_id {partition_id}: expected 0..{self._num_partitions - 1}")
        experts = self.experts()
        return self.dataset.select(np.flatnonzero(experts == partition_id).tolist())

    def experts(self) -> np.ndarray:
        """Each row's partition (-1: a row Atoll's plan skipped)."""
        if self._experts is None:
            self._experts = self._from_plan() if self._plan else self._cluster()
        return self._experts

    def _from_plan(self) -> np.ndarray:
        assert self._plan is not None
        rows, where = self.dataset.num_rows, self._plan["path"]
        labels: list[int] = self._plan["sample_experts"]
        if self._id_column is None:
            if len(labels) != rows:
                raise ValueError(
                    f"{where} covers {len(labels)} samples, the dataset has {rows} rows: "
                    "pass id_column to match rows by id"
                )
            return np.asarray(labels, dtype=np.int64)
        # plan.json keeps labels in data set order; the shard manifests name the samples.
        by_id: dict[str, int] = {}
        for k in range(self._num_partitions):
            # Atoll's shard name (protocol.shard_manifest.shard_file_name), spelled here
            # because this package runs in its own environment and never imports Atoll.
            shard = json.loads((Path(where).parent / f"expert-{k}.json").read_text())
            by_id.update({str(s["id"]): k for s in shard["samples"]})
        ids = [str(i) for i in self.dataset[self._id_column]]
        absent = [i for i in ids if i not in by_id]
        if absent:
            raise ValueError(f"{len(absent)} row id(s) are in no shard of {where}: {absent[:5]}")
        return np.asarray([by_id[i] for i in ids], dtype=np.int64)

    def _row_features(self) -> np.ndarray | list[Any]:
        if isinstance(self._features, str):
            if self._features not in self.dataset.column_names:
                raise ValueError(
                    f"features column {self._features!r} is not in the dataset "
                    f"(columns: {self.dataset.column_names})"
                )
            return list(self.dataset[self._features])
        if self._features is None:
            raise ValueError("give features= (a column name or an array), or use from_plan()")
        if len(self._features) != self.dataset.num_rows:
            raise ValueError(
                f"features has {len(self._features)} rows, the dataset {self.dataset.num_rows}"
            )
        return self._features

    def _cluster(self) -> np.ndarray:
        """Runs Atoll's own partitioning on these rows (see the module docstring)."""
        if not self._encoder:
            raise ValueError(
                "encoder: name the encoder that computed the features (e.g. "
                "'hf:/models/clip-vit-large-patch14-336'); Atoll's plan records it for the router"
            )
        if self._image_column not in self.dataset.column_names:
            raise ValueError(
                f"image column {self._image_column!r} is not in the dataset "
                f"(columns: {self.dataset.column_names})"
            )
        images = self.dataset.cast_column(self._image_column, Image(decode=False))
        vectors = self._row_features()
        with tempfile.TemporaryDirectory(prefix="atoll-partition-") as scratch:
            root = Path(scratch)
            (root / "images").mkdir()
            records: list[dict[str, Any]] = []
            ids: list[str] = []
            seen: set[str] = set()
            rows: list[np.ndarray] = []
            for index, image in enumerate(images[self._image_column]):
                record: dict[str, Any] = {
                    "id": index,
                    "conversations": [{"from": "human", "value": ""}],
                }
                if image is not None:
                    data = image["bytes"] or Path(image["path"]).read_bytes()
                    name = hashlib.sha256(data).hexdigest()
                    if name not in seen:  # one file per picture; its first row's features
                        (root / "images" / name).write_bytes(data)
                        seen.add(name)
                        ids.append(name)
                        rows.append(np.asarray(vectors[index], dtype=np.float32))
                    record["image"] = name
                records.append(record)
            (root / "rows.json").write_text(json.dumps(records))
            np.savez(root / "features.npz", ids=np.asarray(ids), features=np.stack(rows))
            state = str(root / "state")
            self._run("init", "--state", state, "--federation", "flwr-datasets")
            self._run(
                "partition", "--state", state, "--dataset", str(root / "rows.json"),
                "--image-root", str(root / "images"), "--features", str(root / "features.npz"),
                "--feature-encoder", self._encoder, "--experts", str(self._num_partitions),
                "--seed", str(self._seed), "--json",
                *self._partition_args,
            )  # fmt: skip
            plan = json.loads((root / "state" / "partition" / "plan.json").read_text())
        return np.asarray(plan["sample_experts"], dtype=np.int64)

    def _run(self, *argv: str) -> None:
        try:
            done = subprocess.run(
                [self._coordinator, *argv], capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            raise ValueError(
                f"Atoll's `{self._coordinator}` command was not found: pass coordinator="
            ) from None
        if done.returncode != 0:
            raise ValueError(
                f"`coordinator {argv[0]}` exited {done.returncode}: {done.stderr.strip()[-800:]}"
            )
