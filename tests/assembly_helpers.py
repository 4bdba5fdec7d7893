"""A federation with a real partition plan on disk and experts accepted through the real
upload path, for the assembly and download tests (imported by path: tests/ is not a package).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from federation_helpers import record_test_recipe
from safetensors.numpy import save_file

from coordinator.artifacts import register_artifact
from coordinator.store import PlanRecord
from protocol.client import FederationClient
from protocol.digests import file_sha256
from protocol.messages import AssignmentReply, CommitResult
from protocol.partition_plan import PLAN_FILE, PartitionPlan, PlanContent, plan_bytes
from protocol.provenance import TrainingRun, sign_expert
from protocol.shard_manifest import (
    ShardManifest,
    shard_artifact_name,
    shard_file_name,
    shard_manifest_bytes,
)
from site_agent.transfer import upload_directory
from site_agent.workdir import Workdir

TINY_ENCODER = {
    "backend": "open_clip",
    "model": "atoll-tiny-clip",
    "weights": {"random_init_seed": 0},
    "image_size": 32,
    "dim": 32,
}


@dataclass
class Site:
    name: str
    workdir: Workdir
    client: FederationClient
    assignment: AssignmentReply


def write_plan(
    running: Any,
    centroids: np.ndarray,
    samples: list[int],
    encoder: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    center: np.ndarray | None = None,
) -> str:
    """``STATE/partition/`` as `coordinator partition` writes it (centroids, shard manifests,
    plan.json with its digest), registered and recorded; returns the plan digest.
    ``encoder`` replaces the tiny open_clip identity, ``extra`` adds plan.json entries
    (``encoder_spec``, ``features``), ``center`` a mean feature."""
    state, store = running.state, running.coordinator.store
    folder = state.partition_dir
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"centroids": centroids.astype(np.float32)}
    if center is not None:
        tensors["center"] = center.astype(np.float32)
    save_file(tensors, str(folder / "centroids.safetensors"))
    files = {"centroids.safetensors": file_sha256(folder / "centroids.safetensors")}
    for k, count in enumerate(samples):
        shard = ShardManifest(
            expert=k,
            num_experts=len(samples),
            dataset_samples=sum(samples),
            dataset_format="llava",
            samples=[{"id": f"s{k}-{i}", "text": "x"} for i in range(count)],
        )
        (folder / shard_file_name(k)).write_bytes(shard_manifest_bytes(shard))
        files[shard_file_name(k)] = file_sha256(folder / shard_file_name(k))
        register_artifact(
            state, store, shard_artifact_name(k), folder / shard_file_name(k), expert=k
        )
    total = sum(samples)
    content = PlanContent.model_validate(
        {
            "format": "atoll-partition-plan/1",
            "num_experts": len(samples),
            "seed": 0,
            "dataset": {
                "file": "data.json", "format": "llava", "sha256": "5" * 64, "samples": total,
                "image_references": total, "unique_images": total, "text_only": 0,
                "skipped": {"missing_images": 0, "unreadable_images": 0, "samples": 0},
            },
            "encoder": encoder or TINY_ENCODER,
            **(extra or {}),
            "algorithm": {"name": "balanced"},
            "text_only": {"strategy": "random-equal", "seed": 0},
            "clusters": [
                {"expert": k, "unique_images": n, "samples": n, "image_samples": n, "text_only": 0}
                for k, n in enumerate(samples)
            ],
            "sample_experts": [k for k, n in enumerate(samples) for _ in range(n)],
        }
    )  # fmt: skip
    plan = PartitionPlan.seal(content, files)
    (folder / PLAN_FILE).write_bytes(plan_bytes(plan))
    register_artifact(state, store, "partition/plan.json", folder / PLAN_FILE)
    register_artifact(
        state, store, "partition/centroids.safetensors", folder / "centroids.safetensors"
    )
    store.put_plan(PlanRecord(plan.digest, len(samples), time.time()))
    record_test_recipe(store)
    return plan.digest


def join(running: Any, tmp: Path, names: list[str]) -> list[Site]:
    sites = []
    for name in names:
        workdir = running.enrol(tmp, name)
        client = running.client(workdir)
        sites.append(Site(name, workdir, client, client.get_assignment()))
    return sites


def training_run(running: Any, assignment: AssignmentReply) -> TrainingRun:
    """The run a site records, with every digest the coordinator issued."""
    document = json.loads(assignment.assignment_json)
    k = assignment.expert_index
    shard = (running.state.partition_dir / f"expert-{k}.json").read_bytes()
    finished = datetime.now(UTC)
    return TrainingRun(
        expert_index=k,
        assignment_digest=assignment.assignment_digest,
        recipe_digest=document["recipe"]["sha256"],
        base_model_digest=document["base_model"]["digest"],
        shard_manifest_digest=hashlib.sha256(shard).hexdigest(),
        atoll_version="0.1.0",
        invocation_id=str(uuid.uuid4()),
        started_on=finished - timedelta(minutes=5),
        finished_on=finished,
        steps=10,
        final_loss=2.5,
    )


def fake_expert(directory: Path, seed: int) -> None:
    """A tiny save_pretrained-like directory (assembly never loads it)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file(
        {"w": rng.standard_normal((16, 8)).astype(np.float32)}, str(directory / "model.safetensors")
    )
    (directory / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}\n')


def sign_and_upload(
    running: Any, site: Site, root: Path, build: Callable[[Path, int], None] = fake_expert
) -> CommitResult:
    """Builds expert directory ``root`` with ``build(root, seed)``, signs it with the site's
    key and provenance, and uploads it; returns the commit result."""
    k = site.assignment.expert_index
    build(root, 100 + k)
    sign_expert(
        root,
        training_run(running, site.assignment),
        private_key_path=site.workdir.key,
        certificate_path=site.workdir.cert,
        ca_path=site.workdir.ca,
    )
    return upload_directory(site.client, k, root)
