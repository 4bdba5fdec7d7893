"""The coordinator's state directory: where each durable file lives.

::

    STATE/
      federation.json        federation name, created_at, schema version
      ca/ca.key ca.pem       the federation CA (P-256); ca.key is 0600
      signing/signing.key    the coordinator's signing key (P-256, 0600), signing.pub
      signing/signing.pem    its code-signing certificate from the CA (made on first assembly)
      tls/server.key server.pem   the serving certificate, issued by the CA
      store.db               SQLite (WAL)
      artifacts/             files served to sites (partition outputs, base models)
      uploads/<id>/          upload sessions being received
      partition/             the partition plan (centroids, plan.json, expert-<k>.json)
      images.db              the shard images served to sites, and their image root
                             (``coordinator.images``; rewritten by each `partition`)
      ensemble/<version>/    assembled ensemble directories (the newest is published)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from coordinator.store import Store
from protocol.errors import FailedPrecondition, InvalidArgument


def open_store(url: str) -> Store:
    """The store at ``url``: ``sqlite:///ABSOLUTE/PATH``, or ``memory://`` (SQLite in memory,
    gone when closed: for tests)."""
    if url == "memory://":
        return Store(":memory:")
    if url.startswith("sqlite:///"):
        return Store(url.removeprefix("sqlite:///"))
    raise ValueError(f"store URL {url!r}: expected 'sqlite:///PATH' or 'memory://'")


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def federation_file(self) -> Path:
        return self.root / "federation.json"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def signing_key(self) -> Path:
        return self.root / "signing" / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "signing" / "signing.pub"

    @property
    def signing_cert(self) -> Path:
        return self.root / "signing" / "signing.pem"

    @property
    def ensembles_dir(self) -> Path:
        return self.root / "ensemble"

    @property
    def server_key(self) -> Path:
        return self.root / "tls" / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "tls" / "server.pem"

    @property
    def store_path(self) -> Path:
        return self.root / "store.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def partition_dir(self) -> Path:
        return self.root / "partition"

    @property
    def images_index(self) -> Path:
        return self.root / "images.db"

    def exists(self) -> bool:
        return self.federation_file.exists()

    def federation(self) -> str:
        """The federation name; a directory without ``federation.json`` is a clear error."""
        if not self.exists():
            raise FailedPrecondition(
                f"{self.root} is not a coordinator state directory "
                f"(no federation.json): run `coordinator init --state {self.root}` first"
            )
        try:
            data = json.loads(self.federation_file.read_text())
            return str(data["federation"])
        except (ValueError, KeyError) as error:
            raise InvalidArgument(f"{self.federation_file}: unreadable ({error})") from error

    def open_store(self) -> Store:
        self.federation()  # fail clearly on a directory that was never initialised
        return open_store(f"sqlite:///{self.store_path}")
