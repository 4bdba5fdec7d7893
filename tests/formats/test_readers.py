"""The readers of the typed formats refuse a damaged file where they read it, naming the file
and the field: the assembly (plan.json), the coordinator's recipe (its store), a site's
workdir (assignment.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from assembly_helpers import write_plan

from coordinator.assembly import AssemblyConfig, assemble
from coordinator.federation_recipe import current_recipe
from protocol.errors import FailedPrecondition, InvalidArgument
from site_agent.workdir import Workdir

GOLDEN = Path(__file__).parent / "golden" / "v0.1"


def test_assembly_refuses_a_damaged_plan_naming_the_field(running: Any) -> None:
    write_plan(running, np.eye(2, 32), [2, 2])
    path = running.state.partition_dir / "plan.json"
    document = json.loads(path.read_text())
    document["clusters"][1]["samples"] = -1
    path.write_text(json.dumps(document))
    with pytest.raises(
        FailedPrecondition,
        match=r"plan\.json: clusters\.1\.samples: expected a non-negative integer, got -1",
    ):
        assemble(running.state, running.coordinator.store, AssemblyConfig())


def test_a_damaged_recipe_description_is_named(running: Any) -> None:
    store = running.coordinator.store
    good = json.loads((GOLDEN / "recipe.json").read_text())
    store.set_meta("recipe", json.dumps({**good, "sha256": "not-a-digest"}))
    with pytest.raises(InvalidArgument, match=r"recipe description: sha256: String should match"):
        current_recipe(store)


def test_a_damaged_assignment_json_is_named(tmp_path: Path) -> None:
    workdir = Workdir(tmp_path)
    assert workdir.assignment() is None  # none issued yet
    good = json.loads((GOLDEN / "assignment.json").read_text())
    workdir.assignment_file.write_text(json.dumps({**good, "plan_digest": "0" * 64}))
    with pytest.raises(InvalidArgument, match=r"assignment\.json: plan_digest: differs from"):
        workdir.assignment()
    workdir.assignment_file.write_text(json.dumps(good))
    saved = workdir.assignment()
    assert saved is not None and saved.expert_index == 0
    workdir.save_assignment(saved)  # what is written reads back the same
    assert workdir.assignment() == saved
