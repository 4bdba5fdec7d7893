"""Helpers shared by the control-plane tests (imported by path: tests/ is not a package)."""

from __future__ import annotations

import json

from coordinator.store import Store


def record_test_recipe(store: Store) -> None:
    """Records a recipe description as `coordinator recipe` does (without materialising a
    base: control-plane tests never train; tests/test_federation_recipe.py covers the rest)."""
    description = {
        "name": "control-plane-test",
        "sha256": "12" * 32,
        "artifact": "recipe/recipe.yaml",
        "base_model": {"digest": "34" * 32, "served": False, "files": 1, "bytes": 1},
    }
    store.set_meta("recipe", json.dumps(description))
