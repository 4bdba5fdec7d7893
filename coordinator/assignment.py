"""Handing out expert slots: the lowest free slot once a partition plan exists.

An assignment is described by a canonical JSON document (:class:`protocol.assignment.Assignment`)
whose sha256 is the *assignment digest*: the site signs it into its expert's provenance, and the
coordinator recomputes it (:func:`current_assignment`) when the expert comes back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator import audit
from coordinator.federation_recipe import current_recipe
from coordinator.store import ArtifactRecord, AssignmentRecord, Store
from protocol.assignment import ArtifactEntry, Assignment
from protocol.messages import ArtifactRef, AssignmentReply, AssignmentStatus
from protocol.recipe_description import RecipeDescription

PENDING_RETRY_SECONDS = 15


@dataclass(frozen=True)
class IssuedAssignment:
    """An assignment as the coordinator issues it: the record, its document and digest."""

    record: AssignmentRecord
    num_experts: int
    artifacts: tuple[ArtifactRef, ...]
    document: Assignment
    digest: str


def _issue(
    federation: str,
    record: AssignmentRecord,
    num_experts: int,
    recipe: RecipeDescription,
    artifacts: Sequence[ArtifactRecord],
) -> IssuedAssignment:
    # What the site may download: the shared artifacts and its own expert's.
    refs = [
        ArtifactRef(a.name, a.size, a.sha256)
        for a in artifacts
        if a.audience == "sites" and a.expert in (None, record.expert_index)
    ]
    document = Assignment.issue(
        federation=federation,
        recipe=recipe,
        site=record.site,
        expert_index=record.expert_index,
        num_experts=num_experts,
        plan_digest=record.plan_digest,
        assigned_at=record.assigned_at,
        artifacts=[ArtifactEntry(name=a.name, size=a.size, sha256=a.sha256) for a in refs],
    )
    return IssuedAssignment(record, num_experts, tuple(refs), document, document.digest())


def current_assignment(store: Store, federation: str, site: str) -> IssuedAssignment | None:
    """The site's assignment as it is issued now, without assigning anything; None when the
    site holds no slot (or the federation has no plan or recipe)."""
    plan = store.get_plan()
    recipe = current_recipe(store)
    record = store.get_assignment(site)
    if plan is None or recipe is None or record is None:
        return None
    return _issue(federation, record, plan.num_experts, recipe, store.list_artifacts())


def get_assignment(
    store: Store, federation: str, site: str, now: float | None = None
) -> AssignmentReply:
    """The site's assignment, giving it the lowest free slot on its first call (recorded in
    the audit log with the digest the site will sign)."""
    plan = store.get_plan()
    recipe = current_recipe(store)
    if plan is None or recipe is None:
        missing = "partition plan" if plan is None else "training recipe"
        return AssignmentReply(
            AssignmentStatus.PENDING,
            reason=f"the coordinator has no {missing} yet",
            retry_after_seconds=PENDING_RETRY_SECONDS,
        )
    artifacts = store.list_artifacts()

    def assigned(record: AssignmentRecord) -> audit.AuditEvent:
        issued = _issue(federation, record, plan.num_experts, recipe, artifacts)
        return audit.assigned_event(record, issued.digest)

    record = store.assign_expert(site, time.time() if now is None else now, audit=assigned)
    if record is None:
        return AssignmentReply(
            AssignmentStatus.NO_SLOT,
            reason=f"all {plan.num_experts} expert slots are held by other sites",
            retry_after_seconds=PENDING_RETRY_SECONDS * 4,
        )
    issued = _issue(federation, record, plan.num_experts, recipe, artifacts)
    return AssignmentReply(
        AssignmentStatus.ASSIGNED,
        expert_index=record.expert_index,
        num_experts=plan.num_experts,
        plan_digest=record.plan_digest,
        assignment_digest=issued.digest,
        artifacts=issued.artifacts,
        assignment_json=issued.document.canonical(),
    )
