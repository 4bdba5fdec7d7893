"""Site heartbeats and the federation's status table."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from coordinator.store import HeartbeatRecord, SiteRecord, Store
from protocol.errors import InvalidArgument
from protocol.messages import PHASES, Directive, Heartbeat, HeartbeatReply

HEARTBEAT_SECONDS = 10
MAX_STEPS = 1 << 53  # SQLite stores at most 2^63 - 1; JSON readers lose precision past 2^53
# A site is "silent" (not "failed": training goes on offline) after this many missed beats.
SILENT_AFTER_BEATS = 6


def heartbeat(
    store: Store,
    site: SiteRecord,
    beat: Heartbeat,
    interval: int = HEARTBEAT_SECONDS,
    now: float | None = None,
) -> HeartbeatReply:
    if beat.phase not in PHASES:
        raise InvalidArgument(
            f"HeartbeatRequest.phase {beat.phase!r}: expected one of {', '.join(PHASES)}"
        )
    for name in ("loss", "tokens_per_second", "eta_seconds"):
        value = getattr(beat, name)
        if not math.isfinite(value):
            raise InvalidArgument(f"HeartbeatRequest.{name} {value}: expected a finite number")
    for name in ("step", "total_steps"):
        if not 0 <= getattr(beat, name) < MAX_STEPS:
            raise InvalidArgument(
                f"HeartbeatRequest.{name} {getattr(beat, name)}: expected 0 to {MAX_STEPS - 1}"
            )
    if beat.total_steps and beat.step > beat.total_steps:
        raise InvalidArgument(
            f"HeartbeatRequest.step {beat.step} is past total_steps {beat.total_steps}"
        )
    store.record_heartbeat(
        HeartbeatRecord(
            site=site.name,
            at=time.time() if now is None else now,
            phase=beat.phase,
            step=beat.step,
            total_steps=beat.total_steps,
            loss=beat.loss,
            tokens_per_second=beat.tokens_per_second,
            eta_seconds=beat.eta_seconds,
            message=beat.message[:500],
        )
    )
    if site.revoked_at is not None:
        return HeartbeatReply(Directive.STOP, interval, "this site is revoked")
    return HeartbeatReply(Directive.CONTINUE, interval)


@dataclass(frozen=True)
class SiteStatus:
    site: str
    spiffe_id: str
    enrolled_at: float
    revoked: bool
    expert: int | None
    phase: str
    step: int
    total_steps: int
    loss: float
    eta_seconds: float
    last_heartbeat: float | None
    seconds_since_heartbeat: float | None
    silent: bool
    message: str

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def heartbeat_interval(store: Store) -> int:
    """The interval the running coordinator asks sites to beat at (set by `serve`)."""
    return int(store.get_meta("heartbeat_seconds") or HEARTBEAT_SECONDS)


def federation_status(store: Store, now: float | None = None) -> list[SiteStatus]:
    """One row per enrolled site, with its expert, latest progress and silence flag."""
    now = time.time() if now is None else now
    silent_after = heartbeat_interval(store) * SILENT_AFTER_BEATS
    beats = store.latest_heartbeats()
    experts = {a.site: a.expert_index for a in store.list_assignments()}
    rows = []
    for site in store.list_sites():
        if "/reader/" in site.spiffe_id:
            continue  # readers fetch the ensemble; they train nothing
        beat = beats.get(site.name)
        since = None if beat is None else max(0.0, now - beat.at)
        last_contact = beat.at if beat is not None else site.enrolled_at
        rows.append(
            SiteStatus(
                site=site.name,
                spiffe_id=site.spiffe_id,
                enrolled_at=site.enrolled_at,
                revoked=site.revoked_at is not None,
                expert=experts.get(site.name),
                phase=beat.phase if beat else "enrolled",
                step=beat.step if beat else 0,
                total_steps=beat.total_steps if beat else 0,
                loss=beat.loss if beat else 0.0,
                eta_seconds=beat.eta_seconds if beat else 0.0,
                last_heartbeat=beat.at if beat else None,
                seconds_since_heartbeat=since,
                # A site that reported "done" has finished (its agent exits): not silent.
                silent=(beat is None or beat.phase != "done") and now - last_contact > silent_after,
                message=beat.message if beat else "",
            )
        )
    return rows
