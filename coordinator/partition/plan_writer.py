"""Writing a computed plan under ``STATE/partition/`` (see :mod:`coordinator.partition.plan`
for the files): to a temporary sibling directory first, then renamed into place, so
``partition/`` never holds a half-written plan, and an unchanged plan changes nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator import audit
from coordinator.artifacts import register_artifact
from coordinator.state import StateDir
from coordinator.store import PlanRecord
from protocol.canonical import canonical_digest, canonical_json
from protocol.digests import file_sha256
from protocol.errors import FailedPrecondition

if TYPE_CHECKING:
    from coordinator.partition.plan import Plan

__all__ = ["PlanWriteResult", "write_plan"]


@dataclass(frozen=True)
class PlanWriteResult:
    """What ``write_plan`` did.

    Attributes:
        digest: the plan digest.
        changed: False when ``partition/`` already held this exact plan.
        directory: ``STATE/partition``.
    """

    digest: str
    changed: bool
    directory: Path


def _write_files(directory: Path, plan: Plan) -> dict[str, Any]:
    """Writes the plan's files into ``directory``; returns the final ``plan.json`` document."""
    from safetensors.numpy import save_file

    # One metadata key: safetensors stores metadata as a map whose order is not guaranteed,
    # and the bytes must be the same on every run.
    metadata = {
        "atoll": canonical_json(
            {"format": "atoll-centroids/1", "encoder": plan.document["encoder"]}
        ).decode()
    }
    files: dict[str, str] = {}
    if plan.centroids is not None:  # a text-only data set has no image router
        tensors = {"centroids": np.ascontiguousarray(plan.centroids, dtype=np.float32)}
        if plan.center is not None:
            tensors["center"] = np.ascontiguousarray(plan.center, dtype=np.float32)
        save_file(
            tensors,
            str(directory / "centroids.safetensors"),
            metadata=metadata,
        )
        files["centroids.safetensors"] = file_sha256(directory / "centroids.safetensors")
    for shard in plan.shards:
        name = f"expert-{shard['expert']}.json"
        with (directory / name).open("w", encoding="utf-8") as handle:
            json.dump(shard, handle, ensure_ascii=False, separators=(",", ":"))
            handle.write("\n")
        files[name] = file_sha256(directory / name)
    document = {**plan.document, "files": files}
    document["digest"] = canonical_digest(document)
    with (directory / "plan.json").open("w", encoding="utf-8") as handle:
        json.dump(document, handle, ensure_ascii=False, indent=1)
        handle.write("\n")
    return document


def _existing_digest(directory: Path) -> str | None:
    try:
        digest = json.loads((directory / "plan.json").read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) else None


def write_plan(state: StateDir, plan: Plan) -> PlanWriteResult:
    """Writes the plan under ``STATE/partition/``, records it and registers its artifacts.

    Raises:
        FailedPrecondition: experts are already assigned under a different plan (nothing is
            changed then).
    """
    store = state.open_store()
    try:
        final = state.partition_dir
        staging = Path(tempfile.mkdtemp(prefix=".partition-", dir=state.root))
        try:
            document = _write_files(staging, plan)
            digest = document["digest"]
            changed = _existing_digest(final) != digest
            current = store.get_plan()
            if current is not None and current.digest != digest and store.list_assignments():
                raise FailedPrecondition(
                    f"experts are already assigned under plan {current.digest[:12]}; "
                    "the partition plan cannot change now"
                )
            if changed:
                _swap_in(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        store.put_plan(
            PlanRecord(
                digest=digest,
                num_experts=plan.document["num_experts"],
                created_at=time.time(),
                summary_json=canonical_json(plan.summary).decode(),
            ),
            audit=audit.plan_set_event,
        )
        if changed:
            # A plan with fewer experts must not leave the old plan's extra shards served.
            store.remove_artifacts("partition/")
        if plan.centroids is not None:
            register_artifact(
                state, store, "partition/centroids.safetensors", final / "centroids.safetensors"
            )
        register_artifact(state, store, "partition/plan.json", final / "plan.json")
        for shard in plan.shards:
            k = shard["expert"]
            register_artifact(
                state, store, f"partition/expert-{k}.json", final / f"expert-{k}.json", expert=k
            )
        return PlanWriteResult(digest=digest, changed=changed, directory=final)
    finally:
        store.close()


def _swap_in(staging: Path, final: Path) -> None:
    """Replaces ``final`` by ``staging`` with renames: a reader sees the old plan or the new
    one, never a mix."""
    if final.exists():
        retired = final.with_name(f".partition-old-{uuid.uuid4().hex[:8]}")
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(final)
