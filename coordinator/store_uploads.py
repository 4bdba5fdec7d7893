"""The store's upload sessions: the files a site declared and how much of each arrived."""

from __future__ import annotations

import json
import sqlite3

from coordinator.store_audit import append_event
from coordinator.store_records import EventFor, UploadRecord
from coordinator.store_schema import Database
from protocol.errors import FailedPrecondition, InvalidArgument, NotFound
from protocol.messages import UploadFile


class UploadTables(Database):
    def _upload(self, conn: sqlite3.Connection, upload_id: str) -> UploadRecord | None:
        row = conn.execute("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
        if row is None:
            return None
        files = conn.execute(
            "SELECT path, size, sha256, received FROM upload_files WHERE upload_id = ? "
            "ORDER BY position",
            (upload_id,),
        ).fetchall()
        return UploadRecord(
            upload_id=row["upload_id"],
            site=row["site"],
            expert_index=row["expert_index"],
            files=tuple(UploadFile(f["path"], f["size"], f["sha256"]) for f in files),
            received={f["path"]: f["received"] for f in files},
            state=row["state"],
            reason=row["reason"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            receipt_json=row["receipt_json"],
        )

    def begin_upload(
        self, upload: UploadRecord, audit: EventFor[UploadRecord] | None = None
    ) -> UploadRecord:
        """Opens an upload session, or returns the open or accepted one with the same site,
        expert and files (so an interrupted upload resumes with what was already received, and
        a repeated upload of an accepted expert is a no-op). Rejected sessions are not reused.
        ``audit`` is called only when a new session opens (its id is ``upload.upload_id``)."""
        key = manifest_key(upload.files)
        with self._write() as conn:
            row = conn.execute(
                "SELECT upload_id FROM uploads WHERE site = ? AND expert_index = ? AND "
                "manifest_key = ? AND state IN ('open', 'accepted') ORDER BY state = 'open'",
                (upload.site, upload.expert_index, key),
            ).fetchone()
            if row is not None:
                existing = self._upload(conn, row[0])
                assert existing is not None
                return existing
            conn.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, 'open', '', ?, ?, '')",
                (
                    upload.upload_id,
                    upload.site,
                    upload.expert_index,
                    key,
                    upload.created_at,
                    upload.created_at,
                ),
            )
            conn.executemany(
                "INSERT INTO upload_files VALUES (?, ?, ?, ?, 0, ?)",
                [
                    (upload.upload_id, f.path, f.size, f.sha256, i)
                    for i, f in enumerate(upload.files)
                ],
            )
            created = self._upload(conn, upload.upload_id)
            assert created is not None
            if audit is not None:
                append_event(conn, audit(created))
        return created

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        """The upload session with this id, or None."""
        with self._lock:
            return self._upload(self._conn, upload_id)

    def list_uploads(self, state: str | None = None) -> list[UploadRecord]:
        """Every upload session (only those in ``state`` when given), oldest first."""
        with self._lock:
            ids = self._conn.execute(
                "SELECT upload_id FROM uploads WHERE ? IS NULL OR state = ? "
                "ORDER BY created_at, upload_id",
                (state, state),
            ).fetchall()
            found = [self._upload(self._conn, row[0]) for row in ids]
        return [u for u in found if u is not None]

    def advance_upload(self, upload_id: str, path: str, offset: int, length: int) -> int:
        """Records ``length`` more bytes of ``path`` written at ``offset``; returns the new
        received count.

        MUST raise NotFound for an unknown upload or a path not in its file list,
        FailedPrecondition when the session is not open, InvalidArgument when ``offset`` is not
        exactly what was already received or when the file would grow past its declared size.
        """
        with self._write() as conn:
            state = conn.execute(
                "SELECT state FROM uploads WHERE upload_id = ?", (upload_id,)
            ).fetchone()
            if state is None:
                raise NotFound(f"unknown upload id {upload_id!r}")
            if state[0] != "open":
                raise FailedPrecondition(f"upload {upload_id} is already {state[0]}")
            row = conn.execute(
                "SELECT size, received FROM upload_files WHERE upload_id = ? AND path = ?",
                (upload_id, path),
            ).fetchone()
            if row is None:
                raise NotFound(f"upload {upload_id}: {path!r} is not in its file list")
            size, received = row
            if offset != received:
                raise InvalidArgument(
                    f"upload {upload_id}: chunk of {path!r} at offset {offset}, "
                    f"expected offset {received}"
                )
            if offset + length > size:
                raise InvalidArgument(
                    f"upload {upload_id}: chunk would grow {path!r} to {offset + length} bytes, "
                    f"past its declared size {size}"
                )
            conn.execute(
                "UPDATE upload_files SET received = ? WHERE upload_id = ? AND path = ?",
                (offset + length, upload_id, path),
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
        """Closes an open session as ``accepted`` or ``rejected`` with a reason. Finishing a
        session that is already finished MUST raise FailedPrecondition. ``audit`` gets the
        finished record."""
        with self._write() as conn:
            _check_finish(upload_id, self._upload(conn, upload_id), state)
            conn.execute(
                "UPDATE uploads SET state = ?, reason = ?, updated_at = ? WHERE upload_id = ?",
                (state, reason, now, upload_id),
            )
            finished = self._upload(conn, upload_id)
            assert finished is not None
            if audit is not None:
                append_event(conn, audit(finished))
        return finished

    def set_upload_receipt(self, upload_id: str, receipt_json: str) -> UploadRecord:
        """Keeps the receipt of an accepted upload; the first receipt stays (a later call
        returns the record unchanged), so a repeated commit answers the same receipt.

        MUST raise NotFound for an unknown upload, FailedPrecondition unless it is accepted.
        """
        with self._write() as conn:
            current = self._upload(conn, upload_id)
            if current is None:
                raise NotFound(f"unknown upload id {upload_id!r}")
            if current.state != "accepted":
                raise FailedPrecondition(
                    f"upload {upload_id} is {current.state}: only an accepted upload has a receipt"
                )
            if current.receipt_json:
                return current
            conn.execute(
                "UPDATE uploads SET receipt_json = ? WHERE upload_id = ?",
                (receipt_json, upload_id),
            )
            updated = self._upload(conn, upload_id)
        assert updated is not None
        return updated


def manifest_key(files: tuple[UploadFile, ...]) -> str:
    """Identifies an upload's file list, so a resumed BeginUpload finds its session."""
    return json.dumps([[f.path, f.size, f.sha256] for f in files])


def _check_finish(upload_id: str, current: UploadRecord | None, state: str) -> None:
    if state not in ("accepted", "rejected"):
        raise InvalidArgument(f"upload state {state!r}: expected 'accepted' or 'rejected'")
    if current is None:
        raise NotFound(f"unknown upload id {upload_id!r}")
    if current.state != "open":
        raise FailedPrecondition(f"upload {upload_id} is already {current.state}")
