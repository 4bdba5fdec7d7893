"""A site's whole job against a real coordinator on loopback: assignment, verified
artifacts (recipe, materialised base, shard), supervised training of a tiny LLaVA, signing,
upload and acceptance — online (`join`) and offline (`train`, then `upload`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.federation_recipe import set_recipe
from coordinator.images import record_images
from protocol.assignment import SiteAssignment
from protocol.errors import VerificationFailed
from protocol.exit_codes import ExitCode
from protocol.provenance import verify_expert
from site_agent.agent import Agent
from site_agent.cli import main as site_agent_main
from site_agent.supervisor import SupervisorConfig

sys.path.insert(0, str(Path(__file__).parent))
from training.synthetic import write_shard

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
pytestmark = pytest.mark.slow


def federation_with_shard(running: Any, tmp_path: Path) -> Path:
    """A K=1 federation on the tiny-cpu recipe; returns the site's image root."""
    shard = write_shard(tmp_path / "data", image_samples=8, text_samples=4, num_experts=1)
    running.add_plan(1, {"expert-0.json": shard.manifest.read_bytes()})
    set_recipe(running.state, running.coordinator.store, CONFIGS / "tiny-cpu.yaml")
    record_images(running.state, running.coordinator.store, shard.image_root)
    return shard.image_root


def test_join_trains_signs_and_uploads(running: Any, tmp_path: Path) -> None:
    image_root = federation_with_shard(running, tmp_path)
    workdir = running.enrol(tmp_path, "alpha")
    beats: list[str] = []
    with running.client(workdir) as client:
        agent = Agent(
            workdir,
            client,
            image_root=image_root,
            supervisor_config=SupervisorConfig(tick_seconds=0.5, backoff_seconds=0.1),
        )
        original = agent.beat
        agent.beat = lambda: (beats.append(agent.phase), original())[1]  # type: ignore[method-assign]
        assert agent.run() == 0
    assert agent.phase == "done"
    assert "training" in beats and beats[-1] == "done"
    heartbeat = running.coordinator.store.latest_heartbeats()["alpha"]
    assert heartbeat.total_steps > 0
    [accepted] = [
        u for u in (running.coordinator.store.get_upload(uid) for uid in _upload_ids(running)) if u
    ]
    assert accepted.state == "accepted" and accepted.expert_index == 0
    uploaded = running.state.uploads_dir / accepted.upload_id / "files"
    verified = verify_expert(uploaded, trusted_ca_pem=workdir.ca.read_bytes())
    assert verified.provenance.builder_id == "spiffe://testfed/site/alpha"
    assert verified.provenance.run.expert_index == 0
    assert (uploaded / "config.json").exists()


def test_join_without_an_image_root_fetches_the_shard_and_is_accepted(
    running: Any, tmp_path: Path
) -> None:
    image_root = federation_with_shard(running, tmp_path)
    workdir = running.enrol(tmp_path, "alpha")
    config = SupervisorConfig(tick_seconds=0.5, backoff_seconds=0.1)
    with running.client(workdir) as client:
        assert Agent(workdir, client, supervisor_config=config).run() == 0
    assert workdir.agent_state()["phase"] == "done"
    fetched = sorted(p.name for p in workdir.images_dir.iterdir())
    assert fetched == sorted(p.name for p in image_root.iterdir()) and len(fetched) == 8
    [upload_id] = _upload_ids(running)
    record = running.coordinator.store.get_upload(upload_id)
    assert record is not None and record.state == "accepted"


def _upload_ids(running: Any) -> list[str]:
    return [p.name for p in running.state.uploads_dir.iterdir()]


def test_offline_train_then_upload(running: Any, tmp_path: Path) -> None:
    image_root = federation_with_shard(running, tmp_path)
    workdir = running.enrol(tmp_path, "alpha")
    with running.client(workdir) as client:
        online = Agent(workdir, client)
        online.fetch_artifacts(online.fetch_assignment() or {})
    # Offline: no coordinator needed to train and sign.
    code = site_agent_main(
        ["train", "--workdir", str(workdir.root), "--image-root", str(image_root)]
    )
    assert code == 0 and workdir.agent_state()["phase"] == "uploading"
    assert (workdir.root / "run" / "model" / "model.sig").exists()
    code = site_agent_main(
        ["upload", "--workdir", str(workdir.root), "--coordinator", running.address]
    )
    assert code == 0 and workdir.agent_state()["phase"] == "done"


def test_tampered_base_stops_before_training(running: Any, tmp_path: Path) -> None:
    image_root = federation_with_shard(running, tmp_path)
    workdir = running.enrol(tmp_path, "alpha")
    with running.client(workdir) as client:
        agent = Agent(workdir, client, image_root=image_root)
        agent.fetch_artifacts(agent.fetch_assignment() or {})
        config = workdir.artifacts_dir / "base" / "config.json"
        config.write_text(config.read_text() + " ")
        with pytest.raises(VerificationFailed, match=r"base model .*: expected digest"):
            agent.run()
    assert agent.phase == "failed"
    assert not (workdir.root / "run").exists()
    assert running.coordinator.store.latest_heartbeats()["alpha"].phase == "failed"


def test_offline_train_refuses_another_assignment(running: Any, tmp_path: Path) -> None:
    federation_with_shard(running, tmp_path)
    workdir = running.enrol(tmp_path, "alpha")
    with running.client(workdir) as client:
        Agent(workdir, client).fetch_assignment()
    saved = workdir.assignment()
    assert saved is not None
    # Another assignment: the same slot issued at another time (so another digest).
    moved = saved.assignment.model_copy(update={"assigned_at": saved.assignment.assigned_at + 1})
    other = tmp_path / "other-assignment.json"
    other.write_text(json.dumps(SiteAssignment.of(moved).to_json()))
    code = site_agent_main(["train", "--workdir", str(workdir.root), "--assignment", str(other)])
    assert code == ExitCode.PRECONDITION
    assert workdir.assignment() == saved  # the workdir's own assignment is untouched
    assert not (workdir.root / "run").exists()
    # A file whose digest is not its document's is refused as it is read, naming the field.
    forged = tmp_path / "forged-assignment.json"
    forged.write_text(json.dumps({**saved.to_json(), "assignment_digest": "9" * 64}))
    code = site_agent_main(["train", "--workdir", str(workdir.root), "--assignment", str(forged)])
    assert code == ExitCode.BAD_INPUT
    assert workdir.assignment() == saved


def test_join_with_two_processes_ends_accepted(running: Any, tmp_path: Path) -> None:
    image_root = federation_with_shard(running, tmp_path)
    workdir = tmp_path / "site"
    code = site_agent_main(
        ["join", "--coordinator", running.address, "--enrol-address", running.enrol_address,
         "--token", running.invite("alpha"), "--workdir", str(workdir),
         "--image-root", str(image_root), "--procs", "2"]
    )  # fmt: skip
    assert code == 0, (workdir / "run" / "train.log").read_text()[-3000:]
    assert json.loads((workdir / "agent.json").read_text())["phase"] == "done"
    [accepted] = [running.coordinator.store.get_upload(uid) for uid in _upload_ids(running)]
    assert accepted is not None and accepted.state == "accepted"
    run = json.loads((workdir / "run" / "run.json").read_text())
    assert run["launch"] == {"processes": 2, "nodes": 1, "devices": ["cpu", "cpu"], "gpus": []}
    # One progress stream (rank 0's) reached the coordinator's heartbeats.
    heartbeat = running.coordinator.store.latest_heartbeats()["alpha"]
    assert heartbeat.total_steps == run["schedule"]["total_steps"]
    # The signed provenance says how many processes trained the expert.
    uploaded = running.state.uploads_dir / accepted.upload_id / "files"
    verified = verify_expert(uploaded, trusted_ca_pem=(workdir / "tls" / "ca.pem").read_bytes())
    assert (verified.provenance.run.processes, verified.provenance.run.nodes) == (2, 1)
    assert verified.provenance.run.gpus == ()
