"""The store's served artifacts and the published ensemble."""

from __future__ import annotations

import json

from coordinator.store_records import ArtifactRecord, EnsembleRecord
from coordinator.store_schema import Database


class ArtifactTables(Database):
    def put_artifact(self, artifact: ArtifactRecord) -> None:
        """Records (or replaces) the artifact with this name."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?)",
                (
                    artifact.name,
                    artifact.path,
                    artifact.size,
                    artifact.sha256,
                    artifact.expert,
                    artifact.audience,
                ),
            )

    def get_artifact(self, name: str) -> ArtifactRecord | None:
        """The artifact with this name, or None."""
        return self._one(ArtifactRecord, "SELECT * FROM artifacts WHERE name = ?", (name,))

    def list_artifacts(self) -> list[ArtifactRecord]:
        """Every artifact, ordered by name."""
        return self._all(ArtifactRecord, "SELECT * FROM artifacts ORDER BY name")

    def remove_artifacts(self, prefix: str) -> int:
        """Stops serving every artifact whose name starts with ``prefix``; returns how many."""
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM artifacts WHERE substr(name, 1, ?) = ?", (len(prefix), prefix)
            )
        return cursor.rowcount

    def publish_ensemble(self, ensemble: EnsembleRecord) -> None:
        """Records the published ensemble, replacing any earlier one."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO ensemble VALUES (1, ?, ?, ?)",
                (
                    ensemble.manifest_json,
                    json.dumps(list(ensemble.artifact_names)),
                    ensemble.published_at,
                ),
            )

    def get_ensemble(self) -> EnsembleRecord | None:
        """The published ensemble, or None before assembly."""
        rows = self._read("SELECT * FROM ensemble WHERE id = 1")
        if not rows:
            return None
        return EnsembleRecord(
            manifest_json=rows[0]["manifest_json"],
            artifact_names=tuple(json.loads(rows[0]["artifact_names"])),
            published_at=rows[0]["published_at"],
        )
