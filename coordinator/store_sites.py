"""The store's enrolment tokens, enrolled sites and their heartbeats."""

from __future__ import annotations

import dataclasses

from coordinator.store_audit import append_event
from coordinator.store_records import (
    HEARTBEAT_HISTORY,
    EventFor,
    HeartbeatRecord,
    SiteRecord,
    TokenRecord,
)
from coordinator.store_schema import Database
from protocol.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)


class SiteTables(Database):
    def add_token(self, token: TokenRecord, audit: EventFor[TokenRecord] | None = None) -> None:
        """Stores a new token. A token id that already exists MUST raise AlreadyExists.
        ``audit`` gets the stored token."""
        with self._write() as conn:
            if conn.execute(
                "SELECT 1 FROM tokens WHERE token_id = ?", (token.token_id,)
            ).fetchone():
                raise AlreadyExists(f"token id {token.token_id} already exists")
            conn.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    token.token_id,
                    token.site,
                    token.secret_sha256,
                    token.role,
                    token.created_at,
                    token.expires_at,
                    token.used_at,
                ),
            )
            if audit is not None:
                append_event(conn, audit(token))

    def get_token(self, token_id: str) -> TokenRecord | None:
        """The token with this id, used or not, or None."""
        return self._one(TokenRecord, "SELECT * FROM tokens WHERE token_id = ?", (token_id,))

    def enroll_site(
        self,
        token_id: str,
        site: SiteRecord,
        now: float,
        audit: EventFor[SiteRecord] | None = None,
    ) -> SiteRecord:
        """Atomically marks the token used at ``now`` and records (or replaces) the site.

        A token that is unknown or already used MUST raise Unauthenticated and change nothing,
        even when two callers race with the same token. Re-enrolling a site replaces its
        certificate (the old one is refused from then on) and keeps its assignment. ``audit``
        gets the stored site.
        """
        with self._write() as conn:
            row = conn.execute("SELECT used_at FROM tokens WHERE token_id = ?", (token_id,))
            found = row.fetchone()
            if found is None:
                raise Unauthenticated(f"unknown enrolment token {token_id}")
            if found[0] is not None:
                raise Unauthenticated(f"enrolment token {token_id} was already used")
            conn.execute("UPDATE tokens SET used_at = ? WHERE token_id = ?", (now, token_id))
            conn.execute(
                "INSERT INTO sites VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(name) DO UPDATE SET "
                "spiffe_id = excluded.spiffe_id, cert_serial = excluded.cert_serial, "
                "cert_pem = excluded.cert_pem, enrolled_at = excluded.enrolled_at",
                (site.name, site.spiffe_id, site.cert_serial, site.cert_pem, site.enrolled_at),
            )
            row = conn.execute("SELECT * FROM sites WHERE name = ?", (site.name,)).fetchone()
            stored = SiteRecord(**dict(row))
            if audit is not None:
                append_event(conn, audit(stored))
        return stored

    def get_site(self, name: str) -> SiteRecord | None:
        """The enrolled site with this name, or None."""
        return self._one(SiteRecord, "SELECT * FROM sites WHERE name = ?", (name,))

    def list_sites(self) -> list[SiteRecord]:
        """Every enrolled site, ordered by name."""
        return self._all(SiteRecord, "SELECT * FROM sites ORDER BY name")

    def renew_certificate(
        self,
        name: str,
        old_serial: str,
        site: SiteRecord,
        audit: EventFor[SiteRecord] | None = None,
    ) -> SiteRecord:
        """Replaces the certificate of an enrolled site whose current serial is ``old_serial``
        with ``site.cert_serial`` / ``site.cert_pem`` (other fields stay).

        An unknown site MUST raise NotFound; a revoked site MUST raise PermissionDenied; a
        current serial other than ``old_serial`` (a renewal or re-enrolment won the race) MUST
        raise FailedPrecondition; each changes nothing. ``audit`` gets the renewed site.
        """
        with self._write() as conn:
            row = conn.execute("SELECT * FROM sites WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no enrolled site named {name!r}")
            if row["revoked_at"] is not None:
                raise PermissionDenied(f"{name!r} is revoked; its certificate cannot be renewed")
            if row["cert_serial"] != old_serial:
                raise FailedPrecondition(
                    f"{name!r}: certificate {old_serial} is no longer current (now "
                    f"{row['cert_serial']}); renew with the newest certificate"
                )
            conn.execute(
                "UPDATE sites SET cert_serial = ?, cert_pem = ? WHERE name = ?",
                (site.cert_serial, site.cert_pem, name),
            )
            row = conn.execute("SELECT * FROM sites WHERE name = ?", (name,)).fetchone()
            renewed = SiteRecord(**dict(row))
            if audit is not None:
                append_event(conn, audit(renewed))
        return renewed

    def revoke_site(
        self, name: str, now: float, audit: EventFor[SiteRecord] | None = None
    ) -> SiteRecord:
        """Marks the site revoked (idempotent). An unknown site MUST raise NotFound.

        Revoking a revoked site changes nothing: its ``revoked_at`` stays, and no event is
        appended."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM sites WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no enrolled site named {name!r}")
            changed = conn.execute(
                "UPDATE sites SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now, name),
            ).rowcount
            row = conn.execute("SELECT * FROM sites WHERE name = ?", (name,)).fetchone()
            site = SiteRecord(**dict(row))
            if changed and audit is not None:
                append_event(conn, audit(site))
        return site

    def record_heartbeat(self, heartbeat: HeartbeatRecord) -> None:
        """Keeps the latest heartbeat of a site, and appends it to the site's history (which
        keeps the newest ``HEARTBEAT_HISTORY``). An unknown site MUST raise NotFound."""
        with self._write(durable=False) as conn:
            if (
                conn.execute("SELECT 1 FROM sites WHERE name = ?", (heartbeat.site,)).fetchone()
                is None
            ):
                raise NotFound(f"no enrolled site named {heartbeat.site!r}")
            row = dataclasses.astuple(heartbeat)  # the tables' column order
            conn.execute(
                "INSERT OR REPLACE INTO heartbeats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row
            )
            conn.execute(
                "INSERT INTO heartbeat_history (site, at, phase, step, total_steps, loss, "
                "tokens_per_second, eta_seconds, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            # Bounded: drop what falls out of the newest HEARTBEAT_HISTORY of this site.
            conn.execute(
                "DELETE FROM heartbeat_history WHERE site = ? AND seq <= (SELECT seq FROM "
                "heartbeat_history WHERE site = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (heartbeat.site, heartbeat.site, HEARTBEAT_HISTORY),
            )

    def heartbeat_history(self, site: str, limit: int = HEARTBEAT_HISTORY) -> list[HeartbeatRecord]:
        """The site's newest ``limit`` heartbeats, oldest first (empty for an unknown site)."""
        rows = self._read(
            "SELECT site, at, phase, step, total_steps, loss, tokens_per_second, eta_seconds, "
            "message FROM heartbeat_history WHERE site = ? ORDER BY seq DESC LIMIT ?",
            (site, limit),
        )
        return [HeartbeatRecord(**dict(r)) for r in reversed(rows)]

    def latest_heartbeats(self) -> dict[str, HeartbeatRecord]:
        """The latest heartbeat of every site that sent one, keyed by site name."""
        rows = self._read("SELECT * FROM heartbeats")
        return {r["site"]: HeartbeatRecord(**dict(r)) for r in rows}
