"""What `GetEnsemble` answers: the published ensemble's manifest and files."""

from __future__ import annotations

from coordinator.store import Store
from protocol.messages import ArtifactRef, EnsembleInfo


def ensemble_info(store: Store) -> EnsembleInfo:
    published = store.get_ensemble()
    if published is None:
        return EnsembleInfo(False, reason="no ensemble has been assembled yet")
    refs = []
    for name in published.artifact_names:
        artifact = store.get_artifact(name)
        if artifact is None:
            return EnsembleInfo(False, reason=f"published ensemble lists missing file {name!r}")
        refs.append(ArtifactRef(artifact.name, artifact.size, artifact.sha256))
    return EnsembleInfo(True, manifest_json=published.manifest_json, artifacts=tuple(refs))
