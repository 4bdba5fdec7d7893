"""`atoll download`: fetch the published ensemble from a coordinator and verify it.

A consumer enrols once with a reader token (`coordinator invite --role reader NAME`); its key
and certificate stay in ``--workdir`` (default: ``.<OUT>.atoll-reader`` beside the output
directory, so that nothing unsigned sits inside the ensemble). Every file is downloaded
resumably and checked against its sha256 on arrival; the finished directory is then verified
fully (coordinator signature, every expert's signature and provenance) against the pinned
federation CA. Running it again only fetches what is missing or changed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ensemble.verify import verify_ensemble
from protocol.client import Credentials, FederationClient, enrol_with_token
from protocol.download import download_artifact
from protocol.errors import FailedPrecondition, InvalidArgument
from protocol.messages import ArtifactRef
from protocol.retry import Retry

log = logging.getLogger("atoll.download")
PREFIX = "ensemble/"


@dataclass(frozen=True)
class ReaderWorkdir:
    root: Path

    @property
    def credentials(self) -> Credentials:
        return Credentials(
            key=self.root / "reader.key", cert=self.root / "reader.pem", ca=self.root / "ca.pem"
        )

    @property
    def identity_file(self) -> Path:
        return self.root / "reader.json"


def default_workdir(out: Path) -> Path:
    return out.parent / f".{out.name}.atoll-reader"


def _connect(workdir: ReaderWorkdir, address: str, retry: Retry | None) -> FederationClient:
    identity = json.loads(workdir.identity_file.read_text())
    credentials = workdir.credentials
    return FederationClient(
        address,
        identity["federation"],
        credentials.ca.read_bytes(),
        key_pem=credentials.key.read_bytes(),
        cert_pem=credentials.cert.read_bytes(),
        retry=retry,
    )


def _local_path(out: Path, ref: ArtifactRef) -> Path:
    relative = PurePosixPath(ref.name.removeprefix(PREFIX))
    if not ref.name.startswith(PREFIX) or relative.is_absolute() or ".." in relative.parts:
        raise InvalidArgument(f"published file {ref.name!r}: not a path inside the ensemble")
    return out.joinpath(*relative.parts)


def download_ensemble(
    address: str,
    out: Path,
    token: str | None = None,
    workdir: Path | None = None,
    enrol_address: str | None = None,
    progress: bool = False,
    retry: Retry | None = None,
) -> dict[str, Any]:
    """Enrols (first run), downloads every published file into ``out`` and verifies the
    ensemble; returns the verification report."""
    reader = ReaderWorkdir(workdir or default_workdir(out))
    if not reader.identity_file.exists():
        if not token:
            raise FailedPrecondition(
                f"{reader.root} holds no reader identity yet: pass --token "
                "(from `coordinator invite --role reader NAME`)"
            )
        reader.root.mkdir(parents=True, exist_ok=True)
        _, result = enrol_with_token(reader.credentials, address, token, enrol_address, retry)
        reader.identity_file.write_text(
            json.dumps({"federation": result.federation, "spiffe_id": result.spiffe_id}) + "\n"
        )
        log.info("[atoll] enrolled as %s", result.spiffe_id)
    with _connect(reader, address, retry) as client:
        info = client.get_ensemble()
        if not info.ready:
            raise FailedPrecondition(f"the coordinator has no published ensemble: {info.reason}")
        out.mkdir(parents=True, exist_ok=True)
        for ref in info.artifacts:
            target = _local_path(out, ref)
            download_artifact(client, ref, out, progress=progress, target=target)
    return verify_ensemble(out, reader.credentials.ca.read_bytes())
