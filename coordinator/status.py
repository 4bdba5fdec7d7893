"""The federation's status as one document: what `coordinator status --json`, the dashboard
and the metrics endpoint all read.

The JSON form is a stable interface (``"schema": "atoll.status/v1"``; fields are only ever
added under this name, never renamed or removed; ``tests/test_operations.py`` pins the keys).
Times are POSIX seconds, except ``accepted_at``, which is the RFC 3339 time of the signed
audit-log event that accepted the expert.

::

    {"schema": "atoll.status/v1", "federation": "vision-2026", "generated_at": 1.7e9,
     "plan": {"digest": "..", "experts": 8} | null,
     "sites": [{"site", "spiffe_id", "enrolled_at", "revoked", "expert", "phase", "step",
                "total_steps", "loss", "eta_seconds", "last_heartbeat",
                "seconds_since_heartbeat", "silent", "message", "certificate_expires_at"}],
     "experts": [{"index", "site", "phase", "accepted_upload_id", "accepted_model_digest",
                  "accepted_at", "accepted_log_index", "site_revoked"}],
     "uploads": [{"upload_id", "site", "expert", "state", "received_bytes", "total_bytes",
                  "created_at", "updated_at", "reason"}],
     "certificates": {"ca_expires_at", "server_expires_at", "lifetime_days"},
     "audit": {"events", "last_checkpoint_size", "last_checkpoint_at"}}

An expert's ``phase`` is ``unassigned`` (no site holds it), ``accepted`` (an upload of it was
accepted), or else the phase its site last reported.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from coordinator import audit_report, certificates, sites
from coordinator.state import StateDir
from coordinator.store import Store, UploadRecord

SCHEMA = "atoll.status/v1"


@dataclass(frozen=True)
class ExpertStatus:
    index: int
    site: str | None
    phase: str
    accepted_upload_id: str | None
    accepted_model_digest: str | None
    accepted_at: str | None
    accepted_log_index: int | None
    site_revoked: bool


def experts(store: Store, rows: list[sites.SiteStatus]) -> list[ExpertStatus]:
    """One entry per expert slot of the plan (none before partitioning)."""
    plan = store.get_plan()
    if plan is None:
        return []
    holders = {a.expert_index: a.site for a in store.list_assignments()}
    phases = {row.site: row.phase for row in rows}
    revoked = {row.site for row in rows if row.revoked}
    # The latest acceptance of each expert by a site not revoked since (audit log order).
    accepted: dict[int, audit_report.ProvenanceRow] = {}
    for row in audit_report.provenance_table(store):
        if not row.site_revoked:
            accepted[row.expert] = row
    result = []
    for index in range(plan.num_experts):
        site = holders.get(index)
        done = accepted.get(index)
        if done is not None:
            phase = "accepted"
        elif site is None:
            phase = "unassigned"
        else:
            phase = phases.get(site, "assigned")
        result.append(
            ExpertStatus(
                index=index,
                site=site,
                phase=phase,
                accepted_upload_id=done.upload_id if done else None,
                accepted_model_digest=done.model_root_digest if done else None,
                accepted_at=done.accepted_at if done else None,
                accepted_log_index=done.log_index if done else None,
                site_revoked=site in revoked,
            )
        )
    return result


def upload_fields(u: UploadRecord) -> dict[str, Any]:
    """What every listing of upload sessions says of one (status --json, coordinator uploads)."""
    return {
        "upload_id": u.upload_id,
        "site": u.site,
        "expert": u.expert_index,
        "state": u.state,
        "received_bytes": sum(u.received.values()),
        "total_bytes": sum(f.size for f in u.files),
    }


def status_document(state: StateDir, store: Store, now: float | None = None) -> dict[str, Any]:
    """The ``atoll.status/v1`` document (see the module docstring)."""
    now = time.time() if now is None else now
    rows = sites.federation_status(store, now)
    expiries = {s.name: certificates.expires_at(s.cert_pem) for s in store.list_sites()}
    plan = store.get_plan()
    checkpoints = store.list_checkpoints()
    last = checkpoints[-1] if checkpoints else None
    uploads = [
        {
            **upload_fields(u),
            "created_at": u.created_at,
            "updated_at": u.updated_at,
            "reason": u.reason,
        }
        for u in store.list_uploads()
    ]
    return {
        "schema": SCHEMA,
        "federation": state.federation(),
        "generated_at": now,
        "plan": None if plan is None else {"digest": plan.digest, "experts": plan.num_experts},
        "sites": [
            {**row.as_json(), "certificate_expires_at": expiries.get(row.site)} for row in rows
        ],
        "experts": [asdict(e) for e in experts(store, rows)],
        "uploads": uploads,
        "certificates": {
            "ca_expires_at": certificates.file_expires_at(state.ca_cert),
            "server_expires_at": certificates.file_expires_at(state.server_cert),
            "lifetime_days": certificates.lifetime_days(store),
        },
        "audit": {
            "events": store.audit_size(),
            "last_checkpoint_size": last.tree_size if last else None,
            "last_checkpoint_at": last.timestamp if last else None,
        },
    }
