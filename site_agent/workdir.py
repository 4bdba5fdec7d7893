"""A site's working directory: its key (which never leaves it), certificate and progress.

::

    WORKDIR/
      site.json          coordinator address, federation, site name, SPIFFE id
      tls/site.key       the site's P-256 key (0600)
      tls/site.pem       its certificate;  tls/ca.pem  the pinned federation CA
      assignment.json    the assignment as the coordinator issued it (canonical JSON + digest)
      artifacts/         downloaded, verified artifacts (``*.part`` while in flight)
      images/            the shard's images, when the site's own copy lacks some: fetched
                         from the coordinator, or links into the copy (``--image-root``)
      agent.json         the agent's last phase and heartbeat (for `site-agent status`)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protocol.assignment import SiteAssignment, parse_site_assignment
from protocol.errors import FailedPrecondition, InvalidArgument


def write_json(path: Path, value: Any) -> None:
    """Writes JSON atomically (temp file + rename): a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise InvalidArgument(f"{path}: not valid JSON ({error})") from error


@dataclass(frozen=True)
class SiteIdentity:
    coordinator: str
    federation: str
    site: str
    spiffe_id: str


@dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def site_file(self) -> Path:
        return self.root / "site.json"

    @property
    def key(self) -> Path:
        return self.root / "tls" / "site.key"

    @property
    def cert(self) -> Path:
        return self.root / "tls" / "site.pem"

    @property
    def ca(self) -> Path:
        return self.root / "tls" / "ca.pem"

    @property
    def assignment_file(self) -> Path:
        return self.root / "assignment.json"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def agent_file(self) -> Path:
        return self.root / "agent.json"

    def is_enrolled(self) -> bool:
        return self.site_file.exists() and self.cert.exists() and self.key.exists()

    def identity(self) -> SiteIdentity:
        data = read_json(self.site_file)
        if data is None:
            raise FailedPrecondition(
                f"{self.root} holds no enrolled site (no site.json): run `site-agent join "
                "--coordinator HOST:PORT --token TOKEN --workdir ...` first"
            )
        try:
            return SiteIdentity(**data)
        except TypeError as error:
            raise InvalidArgument(f"{self.site_file}: unexpected fields ({error})") from error

    def save_identity(self, identity: SiteIdentity) -> None:
        write_json(self.site_file, asdict(identity))

    def assignment(self) -> SiteAssignment | None:
        """The saved assignment, or None before one was issued.

        Raises:
            InvalidArgument: ``assignment.json`` is not a valid assignment (named field).
        """
        data = read_json(self.assignment_file)
        return None if data is None else parse_site_assignment(data, str(self.assignment_file))

    def save_assignment(self, assignment: SiteAssignment) -> None:
        write_json(self.assignment_file, assignment.to_json())

    def agent_state(self) -> dict[str, Any]:
        data = read_json(self.agent_file)
        return data if isinstance(data, dict) else {}

    def save_agent_state(self, state: dict[str, Any]) -> None:
        write_json(self.agent_file, state)
