"""Golden files for the formats in the middle of the pipeline: partition plans, shard
manifests, the recipe description and a site's assignment, as atoll wrote them before they were typed (main
ef2eb11, ``golden/v0.1``). They must keep loading, and today's writers must give the same
bytes and digests: sites have signed these digests into their experts' provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol.assignment import (
    ArtifactEntry,
    Assignment,
    SiteAssignment,
    load_site_assignment,
    parse_assignment,
)
from protocol.canonical import canonical_digest
from protocol.errors import InvalidArgument, NotFound
from protocol.partition_plan import PartitionPlan, PlanContent, load_plan, plan_bytes
from protocol.recipe_description import parse_recipe_description
from protocol.shard_manifest import (
    load_shard_manifest,
    shard_artifact_name,
    shard_file_name,
    shard_images,
    shard_manifest_bytes,
)

GOLDEN = Path(__file__).parent / "golden" / "v0.1"
PLANS = [GOLDEN, GOLDEN / "internvl", GOLDEN / "text-only"]


def _plan_files(folder: Path) -> dict[str, str]:
    files: dict[str, str] = json.loads((folder / "plan.json").read_text())["files"]
    return files


@pytest.mark.parametrize("folder", PLANS, ids=lambda p: p.name)
def test_shard_manifests_load_and_are_written_byte_for_byte(folder: Path) -> None:
    files = _plan_files(folder)
    for k in (0, 1):
        path = folder / shard_file_name(k)
        manifest = load_shard_manifest(path)
        assert (manifest.expert, manifest.num_experts) == (k, 2)
        assert manifest.sha256 == files[path.name]  # the digest sites sign
        assert shard_manifest_bytes(manifest) == path.read_bytes()
        shard_images(manifest)  # every sample's image fields are well formed


def test_golden_shards_hold_what_the_partition_wrote() -> None:
    llava = load_shard_manifest(GOLDEN / "expert-1.json")
    assert llava.dataset_format == "llava" and llava.datasets is None
    assert llava.dataset_samples == 9
    pair = next(s for s in llava.samples if s["id"] == "pair")
    assert len(pair["image_sha256"]) == 2
    internvl = load_shard_manifest(GOLDEN / "internvl" / "expert-0.json")
    assert internvl.dataset_format == "internvl"
    assert internvl.datasets is not None and internvl.datasets["setA"]["length"] == 2
    assert all("dataset" in sample for sample in internvl.samples)
    text = load_shard_manifest(GOLDEN / "text-only" / "expert-0.json")
    assert not any("image" in sample for sample in text.samples)


def test_shard_name_is_spelled_once() -> None:
    assert shard_file_name(3) == "expert-3.json"
    assert shard_artifact_name(3) == "partition/expert-3.json"


def test_recipe_description_round_trips_to_its_canonical_form() -> None:
    text = (GOLDEN / "recipe.json").read_text().strip()
    description = parse_recipe_description(json.loads(text))
    assert description.name == "tiny-cpu" and description.base_model.served
    assert description.canonical() == text


def test_site_assignment_loads_and_its_digest_reproduces() -> None:
    saved = load_site_assignment(GOLDEN / "assignment.json")
    reply = json.loads((GOLDEN / "assignment-reply.json").read_text())
    document = parse_assignment(reply["assignment_json"])
    # The coordinator's canonical text and digest, from the typed document.
    assert document.canonical() == reply["assignment_json"]
    assert document.digest() == reply["assignment_digest"] == saved.assignment_digest
    assert saved.assignment == document
    assert SiteAssignment.of(document) == saved
    # The artifacts it lists are the plan's and the recipe's, by the one shard name.
    assert saved.artifact(document.shard_artifact).sha256 == _plan_files(GOLDEN)["expert-0.json"]
    recipe = parse_recipe_description(json.loads((GOLDEN / "recipe.json").read_text()))
    assert saved.artifact(recipe.artifact).sha256 == recipe.sha256
    # Issued again from the same record, recipe and artifacts: the same digest.
    issued = Assignment.issue(
        federation=document.federation,
        recipe=recipe,
        site=document.site,
        expert_index=document.expert_index,
        num_experts=document.num_experts,
        plan_digest=document.plan_digest,
        assigned_at=document.assigned_at,
        artifacts=[
            ArtifactEntry(name=a.name, size=a.size, sha256=a.sha256) for a in saved.artifacts
        ],
    )
    assert issued.digest() == saved.assignment_digest


# -- bad input: each names the file, the field and what was expected ----------------------


def _write(tmp_path: Path, name: str, value: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(value))
    return path


def test_bad_shard_manifest_names_file_and_field(tmp_path: Path) -> None:
    good = json.loads((GOLDEN / "expert-0.json").read_text())
    with pytest.raises(NotFound, match="no such file"):
        load_shard_manifest(tmp_path / "expert-9.json")
    path = _write(tmp_path, "expert-0.json", {**good, "num_expert": 2})
    with pytest.raises(InvalidArgument, match=r"expert-0\.json: num_expert: unknown key"):
        load_shard_manifest(path)
    path = _write(tmp_path, "expert-0.json", {**good, "dataset_samples": -1})
    with pytest.raises(
        InvalidArgument, match=r"expert-0\.json: dataset_samples: expected a non-negative integer"
    ):
        load_shard_manifest(path)
    path = _write(tmp_path, "expert-0.json", {**good, "dataset_format": "coco"})
    with pytest.raises(InvalidArgument, match=r"dataset_format: Input should be 'llava' or"):
        load_shard_manifest(path)
    path = _write(tmp_path, "expert-0.json", {**good, "samples": [1]})
    with pytest.raises(InvalidArgument, match=r"samples\[0\]: expected an object"):
        load_shard_manifest(path)


def test_bad_recipe_description_names_the_field() -> None:
    good = json.loads((GOLDEN / "recipe.json").read_text())
    bad = {**good, "base_model": {**good["base_model"], "digest": "abc"}}
    with pytest.raises(InvalidArgument, match=r"recipe description: base_model\.digest: .*'abc'"):
        parse_recipe_description(bad)
    with pytest.raises(InvalidArgument, match="artifact: required, missing"):
        parse_recipe_description({k: v for k, v in good.items() if k != "artifact"})


def test_bad_assignment_json_names_file_and_field(tmp_path: Path) -> None:
    good = json.loads((GOLDEN / "assignment.json").read_text())
    path = _write(tmp_path, "assignment.json", {**good, "assignment_digest": "9" * 64})
    with pytest.raises(InvalidArgument, match=r"assignment\.json: assignment_digest: expected "):
        load_site_assignment(path)
    path = _write(tmp_path, "assignment.json", {**good, "expert_index": 1})
    with pytest.raises(
        InvalidArgument, match=r"expert_index: differs from assignment\.expert_index"
    ):
        load_site_assignment(path)
    document = {**good["assignment"], "expert_index": 2}
    path = _write(tmp_path, "assignment.json", {**good, "assignment": document})
    with pytest.raises(InvalidArgument, match=r"assignment\.expert_index: expected 0\.\.1"):
        load_site_assignment(path)
    artifacts = [{**good["artifacts"][0], "size": "big"}]
    path = _write(tmp_path, "assignment.json", {**good, "artifacts": artifacts})
    with pytest.raises(InvalidArgument, match=r"artifacts\.0\.size: expected a non-negative"):
        load_site_assignment(path)
    path.write_text("[]")
    with pytest.raises(InvalidArgument, match="expected a JSON object, got list"):
        load_site_assignment(path)
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        parse_assignment("{", "the coordinator's assignment")


def test_canonical_digest_is_the_digest_of_the_documents_json() -> None:
    saved = load_site_assignment(GOLDEN / "assignment.json")
    raw = json.loads((GOLDEN / "assignment.json").read_text())["assignment"]
    assert canonical_digest(raw) == saved.assignment.digest()


@pytest.mark.parametrize("folder", PLANS, ids=lambda p: p.name)
def test_plans_load_and_are_written_byte_for_byte(folder: Path) -> None:
    plan = load_plan(folder)
    assert plan_bytes(plan) == (folder / "plan.json").read_bytes()
    content = PlanContent.model_validate(
        {k: v for k, v in plan.to_json().items() if k not in ("files", "digest")}
    )
    assert PartitionPlan.seal(content, plan.files) == plan  # the same digest, recomputed
    assert [row.expert for row in plan.clusters] == [0, 1]
    assert sum(row.samples for row in plan.clusters) == sum(
        1 for expert in plan.sample_experts if expert >= 0
    )


def test_golden_plans_hold_what_the_partition_wrote() -> None:
    llava = load_plan(GOLDEN)
    assert llava.encoder is not None and llava.encoder["model"] == "atoll-tiny-clip"
    assert llava.center is not None and llava.center.images == 5  # the pair is one unit
    assert llava.tokenizer is None and llava.features is None
    internvl = load_plan(GOLDEN / "internvl")
    assert internvl.tokenizer is not None and internvl.features is not None
    assert all(row.tokens is not None for row in internvl.clusters)
    assert internvl.algorithm["name"] == "two-stage"
    text = load_plan(GOLDEN / "text-only")
    assert (
        text.encoder is None and text.center is None and "centroids.safetensors" not in text.files
    )


def test_bad_plan_names_file_and_field(tmp_path: Path) -> None:
    good = json.loads((GOLDEN / "plan.json").read_text())
    with pytest.raises(NotFound, match=r"partition plan .*: no such file"):
        load_plan(tmp_path / "plan.json")
    path = _write(tmp_path, "plan.json", {**good, "digest": "0" * 64})
    with pytest.raises(InvalidArgument, match=r"plan\.json: digest: expected 76fd8e14"):
        load_plan(path)
    clusters = [good["clusters"][0], {**good["clusters"][1], "samples": "many"}]
    path = _write(tmp_path, "plan.json", {**good, "clusters": clusters})
    with pytest.raises(InvalidArgument, match=r"clusters\.1\.samples: expected a non-negative"):
        load_plan(path)
    path = _write(tmp_path, "plan.json", {**good, "clusters": good["clusters"][:1]})
    with pytest.raises(InvalidArgument, match=r"clusters: expected one row per expert 0\.\.1"):
        load_plan(path)
    experts = [*good["sample_experts"][:-1], 2]
    path = _write(tmp_path, "plan.json", {**good, "sample_experts": experts})
    with pytest.raises(InvalidArgument, match=r"sample_experts: expected experts -1\.\.1, got 2"):
        load_plan(path)
    files = {k: v for k, v in good["files"].items() if k != "expert-1.json"}
    path = _write(tmp_path, "plan.json", {**good, "files": files})
    with pytest.raises(InvalidArgument, match=r"files: .*missing \['expert-1\.json'\]"):
        load_plan(path)
    path = _write(tmp_path, "plan.json", {**good, "format": "atoll-partition-plan/2"})
    with pytest.raises(InvalidArgument, match=r"format: Input should be 'atoll-partition-plan/1'"):
        load_plan(path)
    path = _write(tmp_path, "plan.json", {**good, "dataset": {**good["dataset"], "sha": "x"}})
    with pytest.raises(InvalidArgument, match=r"dataset\.sha: unknown key"):
        load_plan(path)
