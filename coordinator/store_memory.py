"""An in-memory store with the same contract as the SQLite one (for tests and dry runs)."""

from __future__ import annotations

import dataclasses
import threading

from coordinator.store import (
    SCHEMA_VERSION,
    ArtifactRecord,
    AssignmentRecord,
    EnsembleRecord,
    HeartbeatRecord,
    PlanRecord,
    SiteRecord,
    Store,
    TokenRecord,
    UploadRecord,
)
from protocol.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)


class MemoryStore(Store):
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._meta: dict[str, str] = {}
        self._tokens: dict[str, TokenRecord] = {}
        self._sites: dict[str, SiteRecord] = {}
        self._heartbeats: dict[str, HeartbeatRecord] = {}
        self._plan: PlanRecord | None = None
        self._assignments: dict[int, AssignmentRecord] = {}
        self._artifacts: dict[str, ArtifactRecord] = {}
        self._uploads: dict[str, UploadRecord] = {}
        self._ensemble: EnsembleRecord | None = None

    def schema_version(self) -> int:
        return SCHEMA_VERSION

    def get_meta(self, key: str) -> str | None:
        return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._meta[key] = value

    def add_token(self, token: TokenRecord) -> None:
        with self._lock:
            if token.token_id in self._tokens:
                raise AlreadyExists(f"token id {token.token_id} already exists")
            self._tokens[token.token_id] = token

    def get_token(self, token_id: str) -> TokenRecord | None:
        return self._tokens.get(token_id)

    def enroll_site(self, token_id: str, site: SiteRecord, now: float) -> SiteRecord:
        with self._lock:
            token = self._tokens.get(token_id)
            if token is None:
                raise Unauthenticated(f"unknown enrolment token {token_id}")
            if token.used_at is not None:
                raise Unauthenticated(f"enrolment token {token_id} was already used")
            self._tokens[token_id] = dataclasses.replace(token, used_at=now)
            previous = self._sites.get(site.name)
            revoked = previous.revoked_at if previous else None
            self._sites[site.name] = dataclasses.replace(site, revoked_at=revoked)
            return self._sites[site.name]

    def get_site(self, name: str) -> SiteRecord | None:
        return self._sites.get(name)

    def list_sites(self) -> list[SiteRecord]:
        with self._lock:
            return [self._sites[name] for name in sorted(self._sites)]

    def revoke_site(self, name: str, now: float) -> SiteRecord:
        with self._lock:
            site = self._sites.get(name)
            if site is None:
                raise NotFound(f"no enrolled site named {name!r}")
            if site.revoked_at is None:
                site = self._sites[name] = dataclasses.replace(site, revoked_at=now)
            return site

    def record_heartbeat(self, heartbeat: HeartbeatRecord) -> None:
        with self._lock:
            if heartbeat.site not in self._sites:
                raise NotFound(f"no enrolled site named {heartbeat.site!r}")
            self._heartbeats[heartbeat.site] = heartbeat

    def latest_heartbeats(self) -> dict[str, HeartbeatRecord]:
        with self._lock:
            return dict(self._heartbeats)

    def put_plan(self, plan: PlanRecord) -> None:
        with self._lock:
            if self._plan is not None and self._plan.digest == plan.digest:
                return
            if self._assignments:
                current = self._plan.digest[:12] if self._plan else "?"
                raise FailedPrecondition(
                    f"{len(self._assignments)} expert(s) are already assigned under plan "
                    f"{current}; the partition plan cannot change now"
                )
            self._plan = plan

    def get_plan(self) -> PlanRecord | None:
        return self._plan

    def assign_expert(self, site: str, now: float) -> AssignmentRecord | None:
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
                    self._assignments[k] = record
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

    def begin_upload(self, upload: UploadRecord) -> UploadRecord:
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
            )
            self._uploads[upload.upload_id] = created
            return created

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        return self._uploads.get(upload_id)

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

    def finish_upload(self, upload_id: str, state: str, reason: str, now: float) -> UploadRecord:
        if state not in ("accepted", "rejected"):
            raise InvalidArgument(f"upload state {state!r}: expected 'accepted' or 'rejected'")
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None:
                raise NotFound(f"unknown upload id {upload_id!r}")
            if upload.state != "open":
                raise FailedPrecondition(f"upload {upload_id} is already {upload.state}")
            finished = dataclasses.replace(upload, state=state, reason=reason, updated_at=now)
            self._uploads[upload_id] = finished
            return finished

    def publish_ensemble(self, ensemble: EnsembleRecord) -> None:
        with self._lock:
            self._ensemble = ensemble

    def get_ensemble(self) -> EnsembleRecord | None:
        return self._ensemble
