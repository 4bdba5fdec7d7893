"""What ``coordinator recipe`` recorded: the federation's training recipe and base checkpoint.

The coordinator keeps it in its store (canonical JSON, meta key ``recipe``) and cites it in
every assignment; a site checks the recipe file and the base against these digests before it
trains, and the coordinator checks them again in the provenance of each expert it accepts::

    {"name": "tiny-cpu", "sha256": "21f2...", "artifact": "recipe/recipe.yaml",
     "base_model": {"digest": "cd5c...", "served": true, "files": 7, "bytes": 566497}}

``base_model.digest`` is the model-signing root digest of the base checkpoint's folder;
``served`` says whether the coordinator serves it (``base/...`` artifacts) or each site brings
its own copy (``site-agent join --base-model PATH``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from protocol.canonical import canonical_json
from protocol.validation import NonNegativeInt, Sha256Hex, StrictFormat, parse_model

__all__ = ["BaseModelDescription", "RecipeDescription", "parse_recipe_description"]


class BaseModelDescription(StrictFormat):
    """The base checkpoint every expert starts from.

    Attributes:
        digest: model-signing root digest of its folder.
        served: True when the coordinator serves it; else sites bring their own copy.
        files: how many files the folder holds.
        bytes: their total size.
    """

    digest: Sha256Hex
    served: bool
    files: NonNegativeInt
    bytes: NonNegativeInt


class RecipeDescription(StrictFormat):
    """The recorded recipe: its name, the sha256 of the recipe file, the artifact sites
    download it as, and the base checkpoint."""

    name: str = Field(min_length=1)
    sha256: Sha256Hex
    artifact: str = Field(min_length=1)
    base_model: BaseModelDescription

    def to_json(self) -> dict[str, Any]:
        """The document as recorded."""
        return self.model_dump(mode="json")

    def canonical(self) -> str:
        """The canonical JSON the store keeps."""
        return canonical_json(self.to_json()).decode()


def parse_recipe_description(data: Any, source: str = "recipe description") -> RecipeDescription:
    """Validates a decoded recipe description.

    Raises:
        InvalidArgument: naming each field that is wrong.
    """
    return parse_model(RecipeDescription, data, source)
