"""Handing out expert slots: the lowest free slot once a partition plan exists."""

from __future__ import annotations

import time
from typing import Any

from coordinator.federation_recipe import current_recipe
from coordinator.store import AssignmentRecord, Store
from protocol.canonical import canonical_digest, canonical_json
from protocol.messages import ArtifactRef, AssignmentReply, AssignmentStatus

PENDING_RETRY_SECONDS = 15


def assignment_document(
    federation: str,
    record: AssignmentRecord,
    num_experts: int,
    recipe: dict[str, Any],
    artifacts: list[ArtifactRef],
) -> dict[str, object]:
    """The canonical description of an assignment; its digest is what provenance cites."""
    return {
        "federation": federation,
        "recipe": {
            "name": recipe["name"],
            "sha256": recipe["sha256"],
            "artifact": recipe["artifact"],
        },
        "base_model": recipe["base_model"],
        "site": record.site,
        "expert_index": record.expert_index,
        "num_experts": num_experts,
        "plan_digest": record.plan_digest,
        "assigned_at": record.assigned_at,
        "artifacts": [{"name": a.name, "size": a.size, "sha256": a.sha256} for a in artifacts],
    }


def get_assignment(
    store: Store, federation: str, site: str, now: float | None = None
) -> AssignmentReply:
    plan = store.get_plan()
    recipe = current_recipe(store)
    if plan is None or recipe is None:
        missing = "partition plan" if plan is None else "training recipe"
        return AssignmentReply(
            AssignmentStatus.PENDING,
            reason=f"the coordinator has no {missing} yet",
            retry_after_seconds=PENDING_RETRY_SECONDS,
        )
    record = store.assign_expert(site, time.time() if now is None else now)
    if record is None:
        return AssignmentReply(
            AssignmentStatus.NO_SLOT,
            reason=f"all {plan.num_experts} expert slots are held by other sites",
            retry_after_seconds=PENDING_RETRY_SECONDS * 4,
        )
    artifacts = [
        ArtifactRef(a.name, a.size, a.sha256)
        for a in store.list_artifacts()
        if a.audience == "sites" and a.expert in (None, record.expert_index)
    ]
    document = assignment_document(federation, record, plan.num_experts, recipe, artifacts)
    return AssignmentReply(
        AssignmentStatus.ASSIGNED,
        expert_index=record.expert_index,
        num_experts=plan.num_experts,
        plan_digest=record.plan_digest,
        assignment_digest=canonical_digest(document),
        artifacts=tuple(artifacts),
        assignment_json=canonical_json(document).decode(),
    )
