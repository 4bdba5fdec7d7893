"""A site's assignment: which expert it trains, from which files, under which plan and recipe.

The coordinator issues it (``coordinator.assignment``) as a canonical JSON document, the
:class:`Assignment`; its sha256 is the *assignment digest*, which the site signs into its
expert's provenance and the coordinator recomputes when the expert comes back. The site keeps
the reply in its workdir as ``assignment.json``, the :class:`SiteAssignment`::

    {"assignment": {"federation": "demo", "site": "site-a", "expert_index": 0,
                    "num_experts": 2, "plan_digest": "76fd...", "assigned_at": 1767225660,
                    "recipe": {"name": "tiny-cpu", "sha256": "21f2...",
                               "artifact": "recipe/recipe.yaml"},
                    "base_model": {"digest": "cd5c...", "served": true, "files": 7,
                                   "bytes": 566497},
                    "artifacts": [{"name": "partition/expert-0.json", "size": 838,
                                   "sha256": "ccb7..."}, ...]},
     "assignment_digest": "b16e...",
     "expert_index": 0, "num_experts": 2, "plan_digest": "76fd...", "artifacts": [...]}

The outer ``expert_index``, ``num_experts``, ``plan_digest`` and ``artifacts`` repeat the
document's (the reply carries them as fields); they must agree, and the digest must be the
document's, or the file is refused. Every side (the coordinator, the site agent, `site-agent
train --assignment FILE`, the expert's inputs) reads it through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from protocol.canonical import canonical_digest, canonical_json
from protocol.errors import InvalidArgument
from protocol.recipe_description import BaseModelDescription, RecipeDescription
from protocol.shard_manifest import shard_artifact_name
from protocol.validation import NonNegativeInt, Sha256Hex, StrictFormat, parse_model, read_json

__all__ = [
    "ArtifactEntry",
    "Assignment",
    "RecipeReference",
    "SiteAssignment",
    "load_site_assignment",
    "parse_assignment",
    "parse_site_assignment",
]


class ArtifactEntry(StrictFormat):
    """A file the site may download: its name, size and sha256."""

    name: str = Field(min_length=1)
    size: NonNegativeInt
    sha256: Sha256Hex


class RecipeReference(StrictFormat):
    """The recipe an assignment names: the artifact to download and the digest it must have."""

    name: str = Field(min_length=1)
    sha256: Sha256Hex
    artifact: str = Field(min_length=1)


class Assignment(StrictFormat):
    """The canonical assignment document; :meth:`digest` is what provenance cites."""

    federation: str = Field(min_length=1)
    recipe: RecipeReference
    base_model: BaseModelDescription
    site: str = Field(min_length=1)
    expert_index: NonNegativeInt
    num_experts: int = Field(ge=1, strict=True)
    plan_digest: Sha256Hex
    assigned_at: float
    artifacts: list[ArtifactEntry]

    @model_validator(mode="after")
    def _in_range(self) -> Assignment:
        if self.expert_index >= self.num_experts:
            raise ValueError(
                f"expert_index: expected 0..{self.num_experts - 1} (num_experts is "
                f"{self.num_experts}), got {self.expert_index}"
            )
        return self

    @classmethod
    def issue(
        cls,
        *,
        federation: str,
        recipe: RecipeDescription,
        site: str,
        expert_index: int,
        num_experts: int,
        plan_digest: str,
        assigned_at: float,
        artifacts: list[ArtifactEntry],
    ) -> Assignment:
        """The document the coordinator issues for one site's slot."""
        return cls(
            federation=federation,
            recipe=RecipeReference(
                name=recipe.name, sha256=recipe.sha256, artifact=recipe.artifact
            ),
            base_model=recipe.base_model,
            site=site,
            expert_index=expert_index,
            num_experts=num_experts,
            plan_digest=plan_digest,
            assigned_at=assigned_at,
            artifacts=artifacts,
        )

    def to_json(self) -> dict[str, Any]:
        """The document as decoded JSON."""
        return self.model_dump(mode="json")

    def canonical(self) -> str:
        """The canonical JSON the reply carries (``assignment_json``)."""
        return canonical_json(self.to_json()).decode()

    def digest(self) -> str:
        """The assignment digest: sha256 of the canonical JSON."""
        return canonical_digest(self.to_json())

    @property
    def shard_artifact(self) -> str:
        """The artifact holding this expert's shard manifest."""
        return shard_artifact_name(self.expert_index)


class SiteAssignment(StrictFormat):
    """``assignment.json`` in a site's workdir: the document, its digest, and the reply's
    fields (which repeat the document's)."""

    assignment: Assignment
    assignment_digest: Sha256Hex
    expert_index: NonNegativeInt
    num_experts: int = Field(ge=1, strict=True)
    plan_digest: Sha256Hex
    artifacts: list[ArtifactEntry]

    @model_validator(mode="after")
    def _consistent(self) -> SiteAssignment:
        document = self.assignment
        for name in ("expert_index", "num_experts", "plan_digest", "artifacts"):
            if getattr(self, name) != getattr(document, name):
                raise ValueError(f"{name}: differs from assignment.{name}")
        actual = document.digest()
        if actual != self.assignment_digest:
            raise ValueError(
                f"assignment_digest: expected {actual} (the digest of assignment), got "
                f"{self.assignment_digest}"
            )
        return self

    @classmethod
    def of(cls, document: Assignment) -> SiteAssignment:
        """The workdir's record of an issued document."""
        return cls(
            assignment=document,
            assignment_digest=document.digest(),
            expert_index=document.expert_index,
            num_experts=document.num_experts,
            plan_digest=document.plan_digest,
            artifacts=document.artifacts,
        )

    def to_json(self) -> dict[str, Any]:
        """The document as the workdir keeps it."""
        return self.model_dump(mode="json")

    def artifact(self, name: str) -> ArtifactEntry:
        """The listed artifact called ``name``.

        Raises:
            InvalidArgument: the assignment lists no such artifact.
        """
        for entry in self.artifacts:
            if entry.name == name:
                return entry
        raise InvalidArgument(f"assignment: lists no artifact {name!r}")


def parse_assignment(text: str, source: str = "assignment") -> Assignment:
    """Validates an assignment document as the coordinator sends it (``assignment_json``).

    Raises:
        InvalidArgument: not JSON, or a field is wrong (named).
    """
    try:
        data = json.loads(text)
    except ValueError as error:
        raise InvalidArgument(f"{source}: not valid JSON ({error})") from None
    return parse_model(Assignment, data, source)


def parse_site_assignment(data: Any, source: str = "assignment.json") -> SiteAssignment:
    """Validates a decoded ``assignment.json``.

    Raises:
        InvalidArgument: a field is wrong, the repeated fields disagree, or the digest is not
            the document's (each named).
    """
    return parse_model(SiteAssignment, data, source)


def load_site_assignment(path: Path) -> SiteAssignment:
    """Reads and validates an ``assignment.json``.

    Raises:
        NotFound: no such file.
        InvalidArgument: not JSON, or not a valid assignment (named).
    """
    _, data = read_json(path, "assignment")
    return parse_site_assignment(data, str(path))
