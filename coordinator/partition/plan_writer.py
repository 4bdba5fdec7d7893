"""Writing a computed plan under ``STATE/partition/`` (see :mod:`coordinator.partition.plan`
for the files): to a temporary sibling directory first, then renamed into place, so
``partition/`` never holds a half-written plan, and an unchanged plan changes nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from coordinator import audit
from coordinator.artifacts import register_artifact
from coordinator.state import StateDir
from coordinator.store import PlanRecord
from protocol.canonical import canonical_json
from protocol.digests import file_sha256
from protocol.errors import AtollError, FailedPrecondition
from protocol.partition_plan import CENTROIDS_FILE, PLAN_FILE, PartitionPlan, load_plan, plan_bytes
from protocol.shard_manifest import (
    PARTITION_PREFIX,
    shard_artifact_name,
    shard_file_name,
    shard_manifest_bytes,
)

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


def _write_files(directory: Path, plan: Plan) -> PartitionPlan:
    """Writes the plan's files into ``directory``; returns the final ``plan.json``."""
    from safetensors.numpy import save_file

    # One metadata key: safetensors stores metadata as a map whose order is not guaranteed,
    # and the bytes must be the same on every run.
    metadata = {
        "atoll": canonical_json(
            {"format": "atoll-centroids/1", "encoder": plan.content.encoder}
        ).decode()
    }
    files: dict[str, str] = {}
    if plan.centroids is not None:  # a text-only data set has no image router
        tensors = {"centroids": np.ascontiguousarray(plan.centroids, dtype=np.float32)}
        if plan.center is not None:
            tensors["center"] = np.ascontiguousarray(plan.center, dtype=np.float32)
        save_file(
            tensors,
            str(directory / CENTROIDS_FILE),
            metadata=metadata,
        )
        files[CENTROIDS_FILE] = file_sha256(directory / CENTROIDS_FILE)
    for shard in plan.shards:
        assert shard.expert is not None  # a plan's shards always say which expert they are
        name = shard_file_name(shard.expert)
        (directory / name).write_bytes(shard_manifest_bytes(shard))
        files[name] = file_sha256(directory / name)
    sealed = PartitionPlan.seal(plan.content, files)
    (directory / PLAN_FILE).write_bytes(plan_bytes(sealed))
    return sealed


def _existing_digest(directory: Path) -> str | None:
    try:
        return load_plan(directory / PLAN_FILE).digest
    except AtollError:
        return None  # no plan yet, or one that cannot stand: replaced either way


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
            digest = _write_files(staging, plan).digest
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
                num_experts=plan.content.num_experts,
                created_at=time.time(),
                summary_json=canonical_json(plan.summary).decode(),
            ),
            audit=audit.plan_set_event,
        )
        if changed:
            # A plan with fewer experts must not leave the old plan's extra shards served.
            store.remove_artifacts(PARTITION_PREFIX)
        if plan.centroids is not None:
            register_artifact(
                state, store, PARTITION_PREFIX + CENTROIDS_FILE, final / CENTROIDS_FILE
            )
        register_artifact(state, store, PARTITION_PREFIX + PLAN_FILE, final / PLAN_FILE)
        for shard in plan.shards:
            k = shard.expert
            assert k is not None
            register_artifact(
                state, store, shard_artifact_name(k), final / shard_file_name(k), expert=k
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
