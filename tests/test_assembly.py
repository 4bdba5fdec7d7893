"""`coordinator assemble`: signed experts accepted over the real upload path become one signed
ensemble directory, published to readers and recorded in the audit log; bad inputs are refused
with a clear error and publish nothing."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from assembly_helpers import Site, join, sign_and_upload, write_plan
from conftest import FAST_FAIL

from coordinator import enrolment
from coordinator.assembly import AssemblyConfig, AssemblyResult, assemble
from coordinator.audit_report import provenance_table
from coordinator.cli import main as coordinator_main
from coordinator.federation import init_federation
from coordinator.sites import federation_status
from coordinator.upload_writer import upload_files_dir
from ensemble.cli import main as atoll_main
from ensemble.cli import verify_path
from protocol.download import download_artifact
from protocol.ensemble_manifest import MANIFEST_FILE, load_manifest, verify_files
from protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    VerificationFailed,
)
from protocol.exit_codes import ExitCode
from protocol.identity import EnrolmentToken
from protocol.messages import ArtifactRef
from protocol.provenance import ENSEMBLE_STATEMENT_FILE
from protocol.signing import SIGNATURE_FILE, verify_model
from site_agent.agent import enrol
from site_agent.workdir import Workdir


def _centroids(k: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((k, 32)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def sites(running: Any, tmp_path: Path) -> Any:
    write_plan(running, _centroids(2), [6, 2])
    joined = join(running, tmp_path, ["alpha", "beta"])
    assert [s.assignment.expert_index for s in joined] == [0, 1]
    yield joined
    for site in joined:
        site.client.close()


def _accept(running: Any, site: Site, tmp: Path) -> None:
    result = sign_and_upload(running, site, tmp / f"upload-{site.name}-{time.monotonic_ns()}")
    assert result.accepted, result.reason


def _published_with_reader(
    running: Any, sites: list[Site], tmp: Path, reader: str
) -> tuple[AssemblyResult, EnrolmentToken]:
    """Every site's expert accepted, the ensemble assembled, and a reader invited:
    ``(assembly result, the reader's enrolment token)``."""
    for site in sites:
        _accept(running, site, tmp)
    result = assemble(running.state, running.coordinator.store, AssemblyConfig())
    token = enrolment.invite(
        running.coordinator.store, running.coordinator.ca, reader, 3600, role="reader"
    )
    return result, token


def _kinds(running: Any) -> list[str]:
    return [r.event().kind for r in running.coordinator.store.audit_events()]


def test_assemble_builds_signs_and_publishes(
    running: Any, sites: list[Site], tmp_path: Path
) -> None:
    for site in sites:
        _accept(running, site, tmp_path)
    store = running.coordinator.store
    result = assemble(running.state, store, AssemblyConfig(tau=40.0, top_k=2))
    root = result.directory
    assert root == running.state.ensembles_dir / "v1" and result.missing == []
    manifest = load_manifest(root)
    verify_files(root, manifest)
    assert manifest.router.tau == 40.0 and manifest.router.top_k == 2
    assert manifest.router.cluster_priors == [0.75, 0.25]
    assert manifest.router.encoder.config_file == "router/encoder/atoll-tiny-clip.json"
    assert manifest.router.encoder.init_seed == 0
    assert [e.site for e in manifest.experts] == [
        "spiffe://testfed/site/alpha",
        "spiffe://testfed/site/beta",
    ]
    # Byte for byte as accepted, signatures included.
    for choice in result.experts:
        record = store.get_upload(choice.upload_id)
        for item in record.files:
            copied = root / f"experts/expert-{choice.index}" / item.path
            assert (
                copied.read_bytes()
                == (upload_files_dir(running.state, record.upload_id) / item.path).read_bytes()
            )
    # The coordinator's own signature covers the whole directory.
    verified = verify_model(
        root,
        trusted_ca_pem=running.state.ca_cert.read_bytes(),
        expected_spiffe_id="spiffe://testfed/coordinator",
    )
    assert "experts/expert-1/model.sig" in verified.digests.files
    assert ENSEMBLE_STATEMENT_FILE in verified.digests.files
    card = (root / "README.md").read_text()
    assert "arXiv:2601.03184" in card and "alpha" in card and "| 0 | 3 |" not in card
    # Published to readers, recorded in the audit log.
    published = store.get_ensemble()
    assert published is not None and json.loads(published.manifest_json) == json.loads(
        (root / MANIFEST_FILE).read_text()
    )
    assert f"ensemble/{SIGNATURE_FILE}" in published.artifact_names
    for name in published.artifact_names:
        assert store.get_artifact(name).audience == "readers"
    assert _kinds(running)[-2:] == ["assembled", "published"]
    # The full verifier accepts it.
    report = verify_path(root, running.state.ca_cert.read_bytes())
    assert report["kind"] == "ensemble" and report["experts"] == [0, 1]


def test_missing_expert_needs_allow_partial(
    running: Any, sites: list[Site], tmp_path: Path
) -> None:
    _accept(running, sites[0], tmp_path)
    store = running.coordinator.store
    with pytest.raises(
        FailedPrecondition, match=r"expert\(s\) 1 have no accepted upload.*--allow-partial"
    ):
        assemble(running.state, store, AssemblyConfig())
    assert store.get_ensemble() is None
    assert not running.state.ensembles_dir.exists() or not any(
        running.state.ensembles_dir.iterdir()
    )
    result = assemble(running.state, store, AssemblyConfig(allow_partial=True))
    manifest = load_manifest(result.directory)
    assert manifest.missing_experts == [1] and manifest.allow_partial
    assert not (result.directory / "experts/expert-1").exists()


def test_revoked_site_is_dropped_only_with_allow_partial(
    running: Any, sites: list[Site], tmp_path: Path
) -> None:
    for site in sites:
        _accept(running, site, tmp_path)
    assert coordinator_main(["revoke", "--state", str(running.state.root), "beta"]) == 0
    code = coordinator_main(["assemble", "--state", str(running.state.root)])
    assert code == ExitCode.PRECONDITION
    assert (
        coordinator_main(
            ["assemble", "--state", str(running.state.root), "--allow-partial", "--json"]
        )
        == 0
    )
    manifest = load_manifest(running.state.ensembles_dir / "v1")
    assert manifest.missing_experts == [1]
    assert "revoked" in (running.state.ensembles_dir / "v1" / "README.md").read_text()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (AssemblyConfig(tau=0.0), r"--tau: expected a finite number > 0, got 0.0"),
        (AssemblyConfig(tau=-1.0), r"--tau"),
        (AssemblyConfig(top_k=0), r"--top-k: expected an integer >= 1"),
        (AssemblyConfig(top_k=3), r"--top-k: expected 1..2 \(the experts present\), got 3"),
    ],
)
def test_bad_router_settings(
    running: Any, sites: list[Site], tmp_path: Path, config: AssemblyConfig, message: str
) -> None:
    for site in sites:
        _accept(running, site, tmp_path)
    with pytest.raises(InvalidArgument, match=message):
        assemble(running.state, running.coordinator.store, config)
    assert running.coordinator.store.get_ensemble() is None


def test_tampered_accepted_file_is_refused(running: Any, sites: list[Site], tmp_path: Path) -> None:
    for site in sites:
        _accept(running, site, tmp_path)
    store = running.coordinator.store
    (row,) = [r for r in provenance_table(store) if r.expert == 1]
    path = upload_files_dir(running.state, row.upload_id) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(
        VerificationFailed,
        match=r"expert 1: accepted file model.safetensors .* changed since acceptance",
    ):
        assemble(running.state, store, AssemblyConfig())
    assert store.get_ensemble() is None
    assert [p.name for p in running.state.ensembles_dir.iterdir()] == []


def test_verify_refuses_a_damaged_ensemble(running: Any, sites: list[Site], tmp_path: Path) -> None:
    for site in sites:
        _accept(running, site, tmp_path)
    result = assemble(running.state, running.coordinator.store, AssemblyConfig())
    ca = running.state.ca_cert.read_bytes()

    def copy() -> Path:
        target = tmp_path / f"copy-{time.monotonic_ns()}"
        shutil.copytree(result.directory, target)
        return target

    tampered = copy()
    weights = tampered / "experts/expert-0/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(
        VerificationFailed, match=r"experts/expert-0/model.safetensors: expected sha256"
    ):
        verify_path(tampered, ca)
    # A re-digested manifest no longer matches the coordinator's signature.
    edited = copy()
    manifest = json.loads((edited / MANIFEST_FILE).read_text())
    manifest["router"]["tau"] = 1.0
    (edited / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(
        VerificationFailed,
        match=r"model.sig: file check: expected sha256 .* for atoll_ensemble.json",
    ):
        verify_path(edited, ca)
    # Another federation's CA is not trusted.
    other = init_federation(tmp_path / "other", "otherfed")
    with pytest.raises(VerificationFailed, match=r"certificate chain check"):
        verify_path(result.directory, other.ca_cert.read_bytes())
    assert atoll_main(["verify", str(result.directory), "--trust", str(running.state.ca_cert)]) == 0


def test_reader_may_fetch_only_the_published_ensemble(
    running: Any, sites: list[Site], tmp_path: Path
) -> None:
    result, token = _published_with_reader(running, sites, tmp_path, "carol")
    workdir = Workdir(tmp_path / "reader")
    identity = enrol(workdir, running.address, str(token), running.enrol_address, retry=FAST_FAIL)
    assert identity.spiffe_id == "spiffe://testfed/reader/carol"
    with running.client(workdir) as reader:
        info = reader.get_ensemble()
        assert info.ready and json.loads(info.manifest_json)["federation_id"] == "testfed"
        ref = next(a for a in info.artifacts if a.name == "ensemble/README.md")
        target = download_artifact(reader, ref, tmp_path / "got")
        assert target.read_bytes() == (result.directory / "README.md").read_bytes()
        with pytest.raises(NotFound, match="no published ensemble file"):
            download_artifact(reader, ArtifactRef("partition/plan.json", 1, "0" * 64), tmp_path)
        with pytest.raises(
            PermissionDenied, match="may call only GetEnsemble and DownloadArtifact"
        ):
            reader.get_assignment()
    # Readers are not sites: not in the status table, and sites still see the ensemble.
    assert [row.site for row in federation_status(running.coordinator.store)] == ["alpha", "beta"]
    assert sites[0].client.get_ensemble().ready


def test_atoll_download_fetches_verifies_and_resumes(
    running: Any, sites: list[Site], tmp_path: Path
) -> None:
    result, token = _published_with_reader(running, sites, tmp_path, "dora")
    out = tmp_path / "downloaded"
    argv = ["download", "--coordinator", running.address, "--out", str(out)]
    argv += ["--enrol-address", running.enrol_address]
    assert atoll_main([*argv, "--token", str(token)]) == 0
    published = sorted(p.relative_to(result.directory) for p in result.directory.rglob("*"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == published
    assert not list(out.rglob("*.part"))
    # Idempotent, and resumes: a lost file comes back without the (spent) token.
    (out / "README.md").unlink()
    assert atoll_main(argv) == 0
    assert (out / "README.md").read_bytes() == (result.directory / "README.md").read_bytes()
    # A tampered local copy is replaced by the verified original.
    manifest = out / MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes().replace(b'"tau"', b'"tau" '))
    assert atoll_main(argv) == 0
    assert manifest.read_bytes() == (result.directory / MANIFEST_FILE).read_bytes()
    assert verify_path(out, running.state.ca_cert.read_bytes())["kind"] == "ensemble"


def test_atoll_download_needs_a_token_first(running: Any, tmp_path: Path) -> None:
    code = atoll_main(["download", "--coordinator", running.address, "--out", str(tmp_path / "x")])
    assert code == ExitCode.PRECONDITION
    assert not (tmp_path / "x").exists()
