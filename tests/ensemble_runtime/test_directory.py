"""Loading an ensemble directory: verification, partial ensembles, and every bad directory
rejected with an error that names what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ensemble.runtime import RoutedEnsemble
from protocol.ensemble_manifest import MANIFEST_FILE, load_manifest
from protocol.errors import InvalidArgument, NotFound, VerificationFailed

from .builders import picture, write_manifest


def _edit(directory: Path, change: Any) -> None:
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_manifest_round_trips(ensemble_dir: Path) -> None:
    manifest = load_manifest(ensemble_dir)
    assert manifest.num_experts == 2 and manifest.present_experts == [0, 1]
    assert manifest.router.text_only.value == "posterior"
    assert manifest.router.encoder.identity["model"] == "atoll-tiny-clip"


def test_tampered_file_fails_verification(damaged: Path) -> None:
    weights = damaged / "experts/expert-1/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(
        VerificationFailed,
        match=r"experts/expert-1/model\.safetensors: expected sha256 [0-9a-f]{16}\.\., got",
    ):
        RoutedEnsemble.from_pretrained(damaged, verify=True, device="cpu")
    # Same size, other bytes: only the digest catches it; without verify it loads.
    RoutedEnsemble.from_pretrained(damaged, verify=False, device="cpu")


def test_tampered_centroids_and_extra_files(damaged: Path) -> None:
    (damaged / "experts/expert-0/extra.bin").write_bytes(b"x")
    with pytest.raises(VerificationFailed, match=r"experts/expert-0/extra\.bin: not listed"):
        RoutedEnsemble.from_pretrained(damaged, device="cpu")
    (damaged / "experts/expert-0/extra.bin").unlink()
    (damaged / "router/centroids.safetensors").write_bytes(b"short")
    with pytest.raises(
        VerificationFailed, match=r"router/centroids\.safetensors: expected \d+ bytes, found 5"
    ):
        RoutedEnsemble.from_pretrained(damaged, device="cpu")


def test_custom_verifier_hook(ensemble_dir: Path) -> None:
    seen: list[Path] = []
    RoutedEnsemble.from_pretrained(ensemble_dir, verifier=lambda d, m: seen.append(d), device="cpu")
    assert seen == [ensemble_dir]


def test_missing_expert_needs_allow_partial(damaged: Path) -> None:
    shutil.rmtree(damaged / "experts/expert-1")
    write_manifest(damaged, num_experts=2)
    with pytest.raises(
        InvalidArgument,
        match=r"missing_experts: expert\(s\) \[1\] are missing and allow_partial is false",
    ):
        RoutedEnsemble.from_pretrained(damaged, device="cpu")
    write_manifest(damaged, num_experts=2, allow_partial=True)
    partial = RoutedEnsemble.from_pretrained(damaged, device="cpu")
    routing = partial.route_images([picture("blue-circle", 1)])
    # The blue circle's own expert is gone: the router renormalises over the present one.
    assert routing.experts.tolist() == [[0]] and routing.probabilities[0, 1] == 0
    result = partial.generate_tokens([None], ["Hi"], max_new_tokens=2, text_only="posterior")
    assert result.experts == [[0]]


def test_expert_directory_gone_but_listed_present(damaged: Path) -> None:
    shutil.rmtree(damaged / "experts/expert-1")
    with pytest.raises(
        VerificationFailed,
        match=r"experts/expert-1: missing, but experts\[1\] is listed as present",
    ):
        RoutedEnsemble.from_pretrained(damaged, verify=True, device="cpu")
    with pytest.raises(NotFound, match=r"experts\[1\]: experts/expert-1 is not in"):
        RoutedEnsemble.from_pretrained(damaged, verify=False, device="cpu")


def test_centroid_count_must_match_experts(damaged: Path) -> None:
    save_file({"centroids": torch.randn(3, 32)}, str(damaged / "router/centroids.safetensors"))
    write_manifest(damaged)
    with pytest.raises(InvalidArgument, match="3 centroids for 2 experts"):
        RoutedEnsemble.from_pretrained(damaged, device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["router"].update(tau=0), r"router\.tau: Input should be greater than 0"),
        (lambda m: m["router"].update(tau=-3.5), r"router\.tau: Input should be greater than 0"),
        (lambda m: m["router"].update(top_k=3), r"router\.top_k: expected 1\.\.2"),
        (
            lambda m: m["router"].update(top_k=0),
            r"router\.top_k: Input should be greater than or equal to 1",
        ),
        (lambda m: m["router"].update(text_only="psychic"), r"router\.text_only: Input should be"),
        (
            lambda m: m["router"].update(cluster_priors=[0.5, 0.25, 0.25]),
            r"router\.cluster_priors: expected 2 \(one per expert\), got 3",
        ),
        (
            lambda m: m["router"].update(cluster_priors=[0.7, 0.7]),
            r"router\.cluster_priors: .*sum to 1",
        ),
        (
            lambda m: m["experts"][1].update(path="../elsewhere"),
            r"experts\.1\.path: .*relative path",
        ),
        (lambda m: m.update(format_version=2), r"format_version: Input should be 1"),
        (lambda m: m.update(surprise=True), r"surprise: Extra inputs are not permitted"),
        (
            lambda m: m["router"]["encoder"].update(init_seed=None),
            r"router\.encoder: weights_file / init_seed: give exactly one",
        ),
        (
            lambda m: m["router"].update(centroids=None),
            r"router: .*encoder / centroids: give both \(an image router\) or neither",
        ),
        (
            lambda m: m["router"].update(centroids=None, encoder=None),
            r"router\.encoder: a llava ensemble needs its image router",
        ),
    ],
)
def test_bad_manifest_fields_are_named(damaged: Path, change: Any, message: str) -> None:
    _edit(damaged, change)
    with pytest.raises(InvalidArgument, match=message):
        RoutedEnsemble.from_pretrained(damaged, device="cpu")


def test_not_an_ensemble(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a directory"):
        RoutedEnsemble.from_pretrained(tmp_path / "nope")
    with pytest.raises(NotFound, match=r"no atoll_ensemble\.json"):
        RoutedEnsemble.from_pretrained(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(InvalidArgument, match="not readable JSON"):
        RoutedEnsemble.from_pretrained(tmp_path)
