"""Protocol hygiene: committed stubs are current, serde round-trips, canonical JSON, CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coordinator.cli import build_parser as coordinator_parser
from ensemble.cli import build_parser as atoll_parser
from protocol import serde
from protocol.canonical import canonical_digest, canonical_json
from protocol.cli_support import parse_duration
from protocol.codegen import GENERATED, generate
from protocol.errors import InvalidArgument
from protocol.messages import (
    ArtifactRef,
    AssignmentReply,
    AssignmentStatus,
    Heartbeat,
    UploadStatus,
)
from site_agent.cli import build_parser as site_parser

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_regeneration(tmp_path: Path) -> None:
    for generated in generate(ROOT, tmp_path):
        committed = ROOT / "protocol" / generated.name
        assert committed.read_bytes() == generated.read_bytes(), (
            f"{committed.name} is stale: run `python -m protocol.codegen` and commit"
        )
    assert {p.name for p in (tmp_path / "protocol").iterdir()} == set(GENERATED)


def test_proto_package_is_versioned() -> None:
    from protocol import federation_pb2 as pb

    assert pb.DESCRIPTOR.package == "atoll.federation.v1"
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["Federation"].methods]
    assert methods == [
        "Enroll",
        "GetAssignment",
        "Heartbeat",
        "DownloadArtifact",
        "BeginUpload",
        "UploadChunk",
        "CommitUpload",
        "GetEnsemble",
        "RenewCertificate",
    ]


def test_serde_round_trips() -> None:
    reply = AssignmentReply(
        AssignmentStatus.ASSIGNED,
        expert_index=3,
        num_experts=4,
        plan_digest="p",
        assignment_digest="d",
        artifacts=(ArtifactRef("a", 1, "0" * 64),),
        assignment_json="{}",
    )
    assert serde.assignment_from_pb(serde.assignment_to_pb(reply)) == reply
    beat = Heartbeat("training", 5, 10, 1.5, 100.0, 30.0, "ok")
    assert serde.heartbeat_from_pb(serde.heartbeat_to_pb(beat)) == beat
    status = UploadStatus("u", "open", {"a": 1, "b": 2})
    assert serde.upload_status_from_pb(serde.upload_status_to_pb(status)) == status


def test_canonical_json_is_key_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()
    assert canonical_digest({"x": 1, "y": 2}) == canonical_digest({"y": 2, "x": 1})


def test_durations() -> None:
    assert parse_duration("24h") == 86400
    assert parse_duration("90s") == 90
    with pytest.raises(InvalidArgument, match="duration '1 day'"):
        parse_duration("1 day")


def _flags(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Every subcommand's option strings: options grow in config, not as ad-hoc flags."""
    result: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                result[name] = sorted(
                    opt for a in sub._actions for opt in (a.option_strings or [a.dest])
                )
    return result


def test_cli_flags_are_pinned() -> None:
    assert _flags(coordinator_parser()) == {
        "init": ["--cert-days", "--federation", "--help", "--state", "-h"],
        "invite": ["--help", "--json", "--role", "--state", "--ttl", "-h", "site"],
        "partition": [
            "--algorithm",
            "--assign",
            "--batch-size",
            "--center",
            "--dataset",
            "--device",
            "--encoder",
            "--experts",
            "--feature-encoder",
            "--features",
            "--fine-clusters",
            "--help",
            "--image-root",
            "--json",
            "--max-iter",
            "--max-points-per-centroid",
            "--no-center",
            "--no-serve-images",
            "--seed",
            "--skip-missing",
            "--state",
            "--tokenizer",
            "--two-stage-balance",
            "--workers",
            "-h",
        ],
        "features": [
            "--batch-size",
            "--dataset",
            "--device",
            "--encoder",
            "--help",
            "--image-root",
            "--json",
            "--out",
            "--workers",
            "-h",
        ],
        "recipe": ["--base-model", "--help", "--json", "--recipe", "--state", "-h"],
        "serve": [
            "--dashboard-listen",
            "--dashboard-token-file",
            "--enrol-listen",
            "--heartbeat-seconds",
            "--help",
            "--listen",
            "--metrics-listen",
            "--state",
            "-h",
        ],
        "health": ["--address", "--help", "--service", "--state", "--timeout", "-h"],
        "status": ["--help", "--json", "--state", "-h"],
        "audit": ["--export", "--help", "--json", "--state", "-h"],
        "uploads": ["--help", "--json", "--older-than", "--prune", "--state", "-h"],
        "revoke": ["--help", "--json", "--state", "-h", "site"],
        "backup": ["--help", "--out", "--passphrase-file", "--state", "-h"],
        "restore": ["--from", "--help", "--passphrase-file", "--state", "-h"],
        "assemble": [
            "--allow-partial",
            "--encoder-weights",
            "--fit-image-root",
            "--fit-tau",
            "--help",
            "--json",
            "--state",
            "--tau",
            "--text-only",
            "--top-k",
            "-h",
        ],
    }
    assert _flags(site_parser()) == {
        "join": [
            "--account",
            "--base-model",
            "--coordinator",
            "--enrol-address",
            "--first-contact-give-up",
            "--give-up",
            "--gpus",
            "--gpus-per-node",
            "--help",
            "--image-root",
            "--launcher",
            "--nodes",
            "--partition",
            "--procs",
            "--slurm-arg",
            "--slurm-template",
            "--time",
            "--token",
            "--until",
            "--workdir",
            "-h",
        ],
        "status": ["--help", "--json", "--workdir", "-h"],
        "train": [
            "--account",
            "--assignment",
            "--base-model",
            "--gpus",
            "--gpus-per-node",
            "--help",
            "--image-root",
            "--launcher",
            "--nodes",
            "--partition",
            "--procs",
            "--slurm-arg",
            "--slurm-template",
            "--time",
            "--workdir",
            "-h",
        ],
        "upload": ["--coordinator", "--help", "--workdir", "-h"],
    }
    assert _flags(atoll_parser()) == {
        "version": ["--help", "-h"],
        "serve": [
            "--backend",
            "--batch-size",
            "--batch-window-ms",
            "--device",
            "--ensemble",
            "--expert-endpoint",
            "--expert-model",
            "--help",
            "--image-root",
            "--listen",
            "--max-batch",
            "--max-queue",
            "--max-tokens",
            "--no-verify",
            "--served-model-name",
            "--timeout",
            "-h",
        ],
        "verify": ["--help", "--json", "--trust", "-h", "path"],
        "audit": ["--against", "--help", "--json", "--key", "--receipt", "-h", "log"],
        "download": [
            "--coordinator",
            "--enrol-address",
            "--help",
            "--json",
            "--out",
            "--token",
            "--workdir",
            "-h",
        ],
        "eval": [
            "--batch-size",
            "--data",
            "--dense",
            "--device",
            "--ensemble",
            "--help",
            "--image-root",
            "--json",
            "--max-new-tokens",
            "--metric",
            "--top-k",
            "--trust",
            "-h",
        ],
        "generate": [
            "--device",
            "--ensemble",
            "--help",
            "--image",
            "--json",
            "--max-new-tokens",
            "--no-verify",
            "--prompt",
            "--sample",
            "--seed",
            "--temperature",
            "--text-only",
            "--top-k",
            "-h",
        ],
    }
