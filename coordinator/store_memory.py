"""An in-memory store with the same contract as the SQLite one (for tests and dry runs)."""

from __future__ import annotations

import dataclasses
import threading

from coordinator.store import (
    HEARTBEAT_HISTORY,
    SCHEMA_VERSION,
    ArtifactRecord,
    AssignmentRecord,
    AuditRecord,
    EnsembleRecord,
    EventFor,
    HeartbeatRecord,
    PlanRecord,
    SiteRecord,
    Store,
    TokenRecord,
    UploadRecord,
    check_finish_upload,
    check_new_checkpoint,
)
from protocol.audit_log import AuditEvent, Checkpoint
from protocol.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from protocol.merkle import leaf_hash


class MemoryStore(Store):
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._meta: dict[str, str] = {}
        self._tokens: dict[str, TokenRecord] = {}
        self._sites: dict[str, SiteRecord] = {}
        self._heartbeats: dict[str, HeartbeatRecord] = {}
        self._history: dict[str, list[HeartbeatRecord]] = {}
        self._plan: PlanRecord | None = None
        self._assignments: dict[int, AssignmentRecord] = {}
        self._artifacts: dict[str, ArtifactRecord] = {}
        self._uploads: dict[str, UploadRecord] = {}
        self._ensemble: EnsembleRecord | None = None
        self._audit: list[AuditRecord] = []
        self._checkpoints: list[Checkpoint] = []

    def _append(self, event: AuditEvent) -> AuditRecord:
        # Callers hold the lock; the event is built before anything changes, so a bad event
        # leaves the state as it was.
        canonical = event.canonical()
        record = AuditRecord(len(self._audit), canonical, leaf_hash(canonical))
        self._audit.append(record)
        return record

    def schema_version(self) -> int:
        return SCHEMA_VERSION

    def get_meta(self, key: str) -> str | None:
        return self._meta.get(key)

    def set_meta(self, key: str, value: str, audit: EventFor[str] | None = None) -> None:
        with self._lock:
            event = audit(value) if audit is not None and self._meta.get(key) != value else None
            self._meta[key] = value
            if event is not None:
                self._append(event)

    def add_token(self, token: TokenRecord, audit: EventFor[TokenRecord] | None = None) -> None:
        with self._lock:
            if token.token_id in self._tokens:
                raise AlreadyExists(f"token id {token.token_id} already exists")
            event = audit(token) if audit is not None else None
            self._tokens[token.token_id] = token
            if event is not None:
                self._append(event)

    def get_token(self, token_id: str) -> TokenRecord | None:
        return self._tokens.get(token_id)

    def enroll_site(
        self,
        token_id: str,
        site: SiteRecord,
        now: float,
        audit: EventFor[SiteRecord] | None = None,
    ) -> SiteRecord:
        with self._lock:
            token = self._tokens.get(token_id)
            if token is None:
                raise Unauthenticated(f"unknown enrolment token {token_id}")
            if token.used_at is not None:
                raise Unauthenticated(f"enrolment token {token_id} was already used")
            previous = self._sites.get(site.name)
            revoked = previous.revoked_at if previous else None
            stored = dataclasses.replace(site, revoked_at=revoked)
            event = audit(stored) if audit else None
            self._tokens[token_id] = dataclasses.replace(token, used_at=now)
            self._sites[site.name] = stored
            if event is not None:
                self._append(event)
            return stored

    def get_site(self, name: str) -> SiteRecord | None:
        return self._sites.get(name)

    def list_sites(self) -> list[SiteRecord]:
        with self._lock:
            return [self._sites[name] for name in sorted(self._sites)]

    def renew_certificate(
        self,
        name: str,
        old_serial: str,
        site: SiteRecord,
        audit: EventFor[SiteRecord] | None = None,
    ) -> SiteRecord:
        with self._lock:
            current = self._sites.get(name)
            if current is None:
                raise NotFound(f"no enrolled site named {name!r}")
            if current.revoked_at is not None:
                raise PermissionDenied(f"{name!r} is revoked; its certificate cannot be renewed")
            if current.cert_serial != old_serial:
                raise FailedPrecondition(
                    f"{name!r}: certificate {old_serial} is no longer current (now "
                    f"{current.cert_serial}); renew with the newest certificate"
                )
            renewed = dataclasses.replace(
                current, cert_serial=site.cert_serial, cert_pem=site.cert_pem
            )
            event = audit(renewed) if audit else None
            self._sites[name] = renewed
            if event is not None:
                self._append(event)
            return renewed

    def revoke_site(
        self, name: str, now: float, audit: EventFor[SiteRecord] | None = None
    ) -> SiteRecord:
        with self._lock:
            site = self._sites.get(name)
            if site is None:
                raise NotFound(f"no enrolled site named {name!r}")
            if site.revoked_at is None:
                site = dataclasses.replace(site, revoked_at=now)
                event = audit(site) if audit else None
                self._sites[name] = site
                if event is not None:
                    self._append(event)
            return site

    def record_heartbeat(self, heartbeat: HeartbeatRecord) -> None:
        with self._lock:
            if heartbeat.site not in self._sites:
                raise NotFound(f"no enrolled site named {heartbeat.site!r}")
            self._heartbeats[heartbeat.site] = heartbeat
            history = self._history.setdefault(heartbeat.site, [])
            history.append(heartbeat)
            del history[:-HEARTBEAT_HISTORY]

    def heartbeat_history(self, site: str, limit: int = HEARTBEAT_HISTORY) -> list[HeartbeatRecord]:
        with self._lock:
            return list(self._history.get(site, [])[-limit:]) if limit > 0 else []

    def latest_heartbeats(self) -> dict[str, HeartbeatRecord]:
        with self._lock:
            return dict(self._heartbeats)

    def put_plan(self, plan: PlanRecord, audit: EventFor[PlanRecord] | None = None) -> None:
        with self._lock:
            if self._plan is not None and self._plan.digest == plan.digest:
                return
            if self._assignments:
                current = self._plan.digest[:12] if self._plan else "?"
                raise FailedPrecondition(
                    f"{len(self._assignments)} expert(s) are already assigned under plan "
                    f"{current}; the partition plan cannot change now"
                )
            event = audit(plan) if audit is not None else None
            self._plan = plan
            if event is not None:
                self._append(event)

    def get_plan(self) -> PlanRecord | None:
        return self._plan

    def assign_expert(
        self, site: str, now: float, audit: EventFor[AssignmentRecord] | None = None
    ) -> AssignmentRecord | None:
        with self._lock:
            if self._plan is None:
                raise FailedPrecondition("no partition plan yet: run `coordinator partition`")
            if site not in self._sites:
                raise NotFound(f"no enrolled site named {site!r}")
            existing = self.get_assignment(site)
            if existing is not None:
                return existing
            for k in range(self._plan.num_experts):
                if k not in self._assignments:
                    record = AssignmentRecord(k, site, self._plan.digest, now)
                    event = audit(record) if audit else None
                    self._assignments[k] = record
                    if event is not None:
                        self._append(event)
                    return record
            return None

    def get_assignment(self, site: str) -> AssignmentRecord | None:
        with self._lock:
            return next((a for a in self._assignments.values() if a.site == site), None)

    def list_assignments(self) -> list[AssignmentRecord]:
        with self._lock:
            return [self._assignments[k] for k in sorted(self._assignments)]

    def put_artifact(self, artifact: ArtifactRecord) -> None:
        with self._lock:
            self._artifacts[artifact.name] = artifact

    def get_artifact(self, name: str) -> ArtifactRecord | None:
        return self._artifacts.get(name)

    def list_artifacts(self) -> list[ArtifactRecord]:
        with self._lock:
            return [self._artifacts[name] for name in sorted(self._artifacts)]

    def remove_artifacts(self, prefix: str) -> int:
        with self._lock:
            names = [name for name in self._artifacts if name.startswith(prefix)]
            for name in names:
                del self._artifacts[name]
            return len(names)

    def begin_upload(
        self, upload: UploadRecord, audit: EventFor[UploadRecord] | None = None
    ) -> UploadRecord:
        with self._lock:
            for existing in self._uploads.values():
                if (
                    existing.state in ("open", "accepted")
                    and existing.site == upload.site
                    and existing.expert_index == upload.expert_index
                    and existing.files == upload.files
                ):
                    return existing
            created = dataclasses.replace(
                upload,
                received={f.path: 0 for f in upload.files},
                state="open",
                reason="",
                updated_at=upload.created_at,
                receipt_json="",
            )
            event = audit(created) if audit else None
            self._uploads[upload.upload_id] = created
            if event is not None:
                self._append(event)
            return created

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        return self._uploads.get(upload_id)

    def list_uploads(self, state: str | None = None) -> list[UploadRecord]:
        with self._lock:
            found = [u for u in self._uploads.values() if state is None or u.state == state]
        return sorted(found, key=lambda u: (u.created_at, u.upload_id))

    def advance_upload(self, upload_id: str, path: str, offset: int, length: int) -> int:
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None:
                raise NotFound(f"unknown upload id {upload_id!r}")
            if upload.state != "open":
                raise FailedPrecondition(f"upload {upload_id} is already {upload.state}")
            declared = {f.path: f.size for f in upload.files}
            if path not in declared:
                raise NotFound(f"upload {upload_id}: {path!r} is not in its file list")
            received = upload.received[path]
            if offset != received:
                raise InvalidArgument(
                    f"upload {upload_id}: chunk of {path!r} at offset {offset}, "
                    f"expected offset {received}"
                )
            if offset + length > declared[path]:
                raise InvalidArgument(
                    f"upload {upload_id}: chunk would grow {path!r} to {offset + length} bytes, "
                    f"past its declared size {declared[path]}"
                )
            self._uploads[upload_id] = dataclasses.replace(
                upload, received={**upload.received, path: offset + length}
            )
            return offset + length

    def finish_upload(
        self,
        upload_id: str,
        state: str,
        reason: str,
        now: float,
        audit: EventFor[UploadRecord] | None = None,
    ) -> UploadRecord:
        with self._lock:
            upload = self._uploads.get(upload_id)
            check_finish_upload(upload_id, upload, state)
            assert upload is not None
            finished = dataclasses.replace(upload, state=state, reason=reason, updated_at=now)
            event = audit(finished) if audit else None
            self._uploads[upload_id] = finished
            if event is not None:
                self._append(event)
            return finished

    def set_upload_receipt(self, upload_id: str, receipt_json: str) -> UploadRecord:
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None:
                raise NotFound(f"unknown upload id {upload_id!r}")
            if upload.state != "accepted":
                raise FailedPrecondition(
                    f"upload {upload_id} is {upload.state}: only an accepted upload has a receipt"
                )
            if not upload.receipt_json:
                upload = self._uploads[upload_id] = dataclasses.replace(
                    upload, receipt_json=receipt_json
                )
            return upload

    def append_audit_event(self, event: AuditEvent) -> AuditRecord:
        with self._lock:
            return self._append(event)

    def audit_size(self) -> int:
        with self._lock:
            return len(self._audit)

    def audit_events(self, start: int = 0, end: int | None = None) -> list[AuditRecord]:
        with self._lock:
            return self._audit[start:end]

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._lock:
            latest = self._checkpoints[-1] if self._checkpoints else None
            check_new_checkpoint(latest, checkpoint, len(self._audit))
            self._checkpoints.append(checkpoint)

    def list_checkpoints(self) -> list[Checkpoint]:
        with self._lock:
            return list(self._checkpoints)

    def publish_ensemble(self, ensemble: EnsembleRecord) -> None:
        with self._lock:
            self._ensemble = ensemble

    def get_ensemble(self) -> EnsembleRecord | None:
        return self._ensemble
