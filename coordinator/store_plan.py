"""The store's federation settings, partition plan and expert assignments."""

from __future__ import annotations

from coordinator.store_audit import append_event
from coordinator.store_records import AssignmentRecord, EventFor, PlanRecord
from coordinator.store_schema import Database
from protocol.errors import FailedPrecondition, NotFound


class PlanTables(Database):
    def get_meta(self, key: str) -> str | None:
        """A federation-level setting (e.g. ``federation``), or None when unset."""
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str, audit: EventFor[str] | None = None) -> None:
        """Sets a federation-level setting, replacing any previous value. ``audit`` gets the
        new value and is called only when the value changes."""
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            if audit is not None and (row is None or row[0] != value):
                append_event(conn, audit(value))

    def put_plan(self, plan: PlanRecord, audit: EventFor[PlanRecord] | None = None) -> None:
        """Records the partition plan. Storing the same digest again is a no-op (no event);
        replacing the plan once any expert is assigned MUST raise FailedPrecondition.
        ``audit`` gets the new plan."""
        with self._write() as conn:
            current = conn.execute("SELECT digest FROM plan WHERE id = 1").fetchone()
            if current is not None and current[0] == plan.digest:
                return
            assigned = conn.execute("SELECT COUNT(*) FROM assignments").fetchone()[0]
            if assigned:
                raise FailedPrecondition(
                    f"{assigned} expert(s) are already assigned under plan "
                    f"{current[0][:12] if current else '?'}; the partition plan cannot change now"
                )
            conn.execute(
                "INSERT OR REPLACE INTO plan VALUES (1, ?, ?, ?, ?)",
                (plan.digest, plan.num_experts, plan.created_at, plan.summary_json),
            )
            if audit is not None:
                append_event(conn, audit(plan))

    def get_plan(self) -> PlanRecord | None:
        """The current partition plan, or None before partitioning."""
        return self._one(
            PlanRecord, "SELECT digest, num_experts, created_at, summary_json FROM plan"
        )

    def assign_expert(
        self, site: str, now: float, audit: EventFor[AssignmentRecord] | None = None
    ) -> AssignmentRecord | None:
        """The site's assignment: its existing slot, else the lowest free slot 0..K-1.

        Returns None when every slot is held by another site. No plan MUST raise
        FailedPrecondition; a site that is not enrolled MUST raise NotFound. Two sites MUST
        never hold the same slot, even when racing. ``audit`` is called only when a slot is
        newly given (a repeated call returns the existing record and appends nothing).
        """
        with self._write() as conn:
            plan = conn.execute("SELECT digest, num_experts FROM plan WHERE id = 1").fetchone()
            if plan is None:
                raise FailedPrecondition("no partition plan yet: run `coordinator partition`")
            if conn.execute("SELECT 1 FROM sites WHERE name = ?", (site,)).fetchone() is None:
                raise NotFound(f"no enrolled site named {site!r}")
            row = conn.execute("SELECT * FROM assignments WHERE site = ?", (site,)).fetchone()
            if row is not None:
                return AssignmentRecord(**dict(row))
            taken = {r[0] for r in conn.execute("SELECT expert_index FROM assignments")}
            free = [k for k in range(plan["num_experts"]) if k not in taken]
            if not free:
                return None
            record = AssignmentRecord(free[0], site, plan["digest"], now)
            conn.execute(
                "INSERT INTO assignments VALUES (?, ?, ?, ?)",
                (record.expert_index, record.site, record.plan_digest, record.assigned_at),
            )
            if audit is not None:
                append_event(conn, audit(record))
        return record

    def get_assignment(self, site: str) -> AssignmentRecord | None:
        """The site's assignment, or None."""
        return self._one(AssignmentRecord, "SELECT * FROM assignments WHERE site = ?", (site,))

    def list_assignments(self) -> list[AssignmentRecord]:
        """Every assignment, ordered by expert index."""
        return self._all(AssignmentRecord, "SELECT * FROM assignments ORDER BY expert_index")
