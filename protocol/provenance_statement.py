"""The provenance statement of an expert: an in-toto Statement v1 with a SLSA Provenance v1
predicate, built from a :class:`TrainingRun` and parsed back (:mod:`protocol.provenance`
signs and verifies it).

* ``subject``: the expert, by its model-signing root digest (the subject of ``model.sig``);
* ``predicate`` (SLSA Provenance v1):

  * ``buildDefinition.buildType``: :data:`BUILD_TYPE`;
  * ``externalParameters``: ``expertIndex``, ``assignmentDigest``, ``recipeDigest``;
  * ``resolvedDependencies``: ``base-model`` and ``shard-manifest`` (by sha256) and the
    ``atoll`` package (``pkg:pypi/atoll@<version>``);
  * ``runDetails.builder.id``: the site's SPIFFE id;
    ``runDetails.metadata``: ``invocationId``, ``startedOn``, ``finishedOn``;
    ``runDetails.byproducts``: ``training-summary`` (steps, final loss, GPUs) as annotations,
    with the sha256 of their canonical JSON.

Statements already signed must be reproduced byte for byte (``tests/signing/golden``): a new
field is written only when it is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from protocol.canonical import canonical_digest
from protocol.digests import check_sha256_hex
from protocol.errors import InvalidArgument, VerificationFailed
from protocol.signing import PROVENANCE_FILE

__all__ = [
    "BUILD_TYPE",
    "SLSA_PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "ExpertProvenance",
    "TrainingRun",
    "parse_statement",
    "provenance_statement",
]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://atoll.dev/buildtypes/expert-training/v1"
_SUMMARY = "training-summary"


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise InvalidArgument(f"timestamp {moment.isoformat()}: expected a timezone-aware time")
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class TrainingRun:
    """What the site agent knows about one training run (all digests: hex sha256).

    Attributes:
        expert_index: The expert k this run trained.
        assignment_digest: Digest of the assignment the coordinator issued.
        recipe_digest: Digest of the training recipe.
        base_model_digest: Root digest of the base checkpoint trained from.
        shard_manifest_digest: Digest of the shard manifest (the data).
        atoll_version: Version of the atoll package that trained.
        invocation_id: Unique id of this run (e.g. a UUID).
        started_on: Start of training (timezone-aware).
        finished_on: End of training (timezone-aware).
        steps: Optimiser steps taken.
        final_loss: Last training loss (finite).
        gpus: Names of the devices used, one per GPU (empty on CPU).
        processes: Ranks that trained (torchrun's world size), when recorded.
        nodes: Machines those ranks ran on, when recorded.
    """

    expert_index: int
    assignment_digest: str
    recipe_digest: str
    base_model_digest: str
    shard_manifest_digest: str
    atoll_version: str
    invocation_id: str
    started_on: datetime
    finished_on: datetime
    steps: int
    final_loss: float
    gpus: tuple[str, ...] = ()
    processes: int | None = None
    nodes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.expert_index, bool) or self.expert_index < 0:
            raise InvalidArgument(
                f"expert_index: expected an integer >= 0, got {self.expert_index}"
            )
        for name in ("assignment_digest", "recipe_digest", "base_model_digest"):
            check_sha256_hex(getattr(self, name), name)
        check_sha256_hex(self.shard_manifest_digest, "shard_manifest_digest")
        if not self.atoll_version or not self.invocation_id:
            raise InvalidArgument("atoll_version and invocation_id must not be empty")
        started, finished = _rfc3339(self.started_on), _rfc3339(self.finished_on)
        if self.finished_on < self.started_on:
            raise InvalidArgument(f"finished_on {finished} is before started_on {started}")
        if self.steps < 0:
            raise InvalidArgument(f"steps: expected >= 0, got {self.steps}")
        if not math.isfinite(self.final_loss):
            raise InvalidArgument(f"final_loss: expected a finite number, got {self.final_loss}")
        for name in ("processes", "nodes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise InvalidArgument(f"{name}: expected an integer >= 1, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        """The run as a flat JSON object (times as RFC 3339), for reports and audit events."""
        value = {f.name: getattr(self, f.name) for f in fields(self)}
        value["started_on"] = _rfc3339(self.started_on)
        value["finished_on"] = _rfc3339(self.finished_on)
        value["gpus"] = list(self.gpus)
        return value


@dataclass(frozen=True)
class ExpertProvenance:
    """A provenance statement's content: which model, who built it, and the run.

    Attributes:
        model_root_digest: The model-signing root digest of the expert directory.
        builder_id: The site's SPIFFE id.
        run: The training run.
    """

    model_root_digest: str
    builder_id: str
    run: TrainingRun


def provenance_statement(provenance: ExpertProvenance) -> dict[str, Any]:
    """The in-toto Statement v1 (SLSA Provenance v1 predicate) for ``provenance``."""
    check_sha256_hex(provenance.model_root_digest, "model_root_digest")
    if not provenance.builder_id.startswith("spiffe://"):
        raise InvalidArgument(f"builder_id {provenance.builder_id!r}: expected a spiffe:// id")
    run = provenance.run
    summary: dict[str, Any] = {
        "steps": run.steps,
        "finalLoss": run.final_loss,
        "gpus": list(run.gpus),
    }
    # Statements from before these were recorded lack them; theirs must stay byte for byte.
    if run.processes is not None:
        summary["processes"] = run.processes
    if run.nodes is not None:
        summary["nodes"] = run.nodes
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            {
                "name": f"expert-{run.expert_index}",
                "digest": {"sha256": provenance.model_root_digest},
            }
        ],
        "predicateType": SLSA_PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "expertIndex": run.expert_index,
                    "assignmentDigest": {"sha256": run.assignment_digest},
                    "recipeDigest": {"sha256": run.recipe_digest},
                },
                "resolvedDependencies": [
                    {"name": "base-model", "digest": {"sha256": run.base_model_digest}},
                    {"name": "shard-manifest", "digest": {"sha256": run.shard_manifest_digest}},
                    {"name": "atoll", "uri": f"pkg:pypi/atoll@{run.atoll_version}"},
                ],
            },
            "runDetails": {
                "builder": {"id": provenance.builder_id},
                "metadata": {
                    "invocationId": run.invocation_id,
                    "startedOn": _rfc3339(run.started_on),
                    "finishedOn": _rfc3339(run.finished_on),
                },
                "byproducts": [
                    {
                        "name": _SUMMARY,
                        "digest": {"sha256": canonical_digest(summary)},
                        "annotations": summary,
                    }
                ],
            },
        },
    }


def parse_statement(statement: Any) -> ExpertProvenance:
    """The inverse of :func:`provenance_statement`, strict about types and shape."""
    try:
        if statement["_type"] != STATEMENT_TYPE:
            raise ValueError(f"_type is {statement['_type']!r}, expected {STATEMENT_TYPE}")
        if statement["predicateType"] != SLSA_PREDICATE_TYPE:
            raise ValueError(
                f"predicateType is {statement['predicateType']!r}, expected {SLSA_PREDICATE_TYPE}"
            )
        (subject,) = statement["subject"]
        build = statement["predicate"]["buildDefinition"]
        if build["buildType"] != BUILD_TYPE:
            raise ValueError(f"buildType is {build['buildType']!r}, expected {BUILD_TYPE}")
        external = build["externalParameters"]
        dependencies = {d["name"]: d for d in build["resolvedDependencies"]}
        details = statement["predicate"]["runDetails"]
        metadata = details["metadata"]
        summary = {b["name"]: b for b in details["byproducts"]}[_SUMMARY]
        if summary["digest"]["sha256"] != canonical_digest(summary["annotations"]):
            raise ValueError("training-summary digest does not match its annotations")
        atoll_uri = dependencies["atoll"]["uri"]
        if not atoll_uri.startswith("pkg:pypi/atoll@"):
            raise ValueError(f"atoll dependency uri {atoll_uri!r}")
        if not isinstance(external["expertIndex"], int):
            raise ValueError("externalParameters.expertIndex is not an integer")
        run = TrainingRun(
            expert_index=external["expertIndex"],
            assignment_digest=external["assignmentDigest"]["sha256"],
            recipe_digest=external["recipeDigest"]["sha256"],
            base_model_digest=dependencies["base-model"]["digest"]["sha256"],
            shard_manifest_digest=dependencies["shard-manifest"]["digest"]["sha256"],
            atoll_version=atoll_uri.removeprefix("pkg:pypi/atoll@"),
            invocation_id=metadata["invocationId"],
            started_on=datetime.fromisoformat(metadata["startedOn"]),
            finished_on=datetime.fromisoformat(metadata["finishedOn"]),
            steps=summary["annotations"]["steps"],
            final_loss=float(summary["annotations"]["finalLoss"]),
            gpus=tuple(summary["annotations"]["gpus"]),
            processes=summary["annotations"].get("processes"),
            nodes=summary["annotations"].get("nodes"),
        )
        return ExpertProvenance(
            model_root_digest=check_sha256_hex(subject["digest"]["sha256"], "subject digest"),
            builder_id=details["builder"]["id"],
            run=run,
        )
    except (KeyError, TypeError, ValueError, InvalidArgument) as error:
        raise VerificationFailed(
            f"{PROVENANCE_FILE}: not an atoll SLSA v1 provenance statement "
            f"({type(error).__name__}: {error})"
        ) from error
