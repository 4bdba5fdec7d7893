"""A site's expert work, from a verified assignment to a signed checkpoint (no network).

The same functions serve `site-agent join` (online) and `site-agent train` (an offline site):
check the files the assignment names (recipe, base model, shard), run the supervised trainer,
sign the final checkpoint with the site's key (``model.sig`` + ``provenance.sigstore.json``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from protocol.assignment import SiteAssignment
from protocol.digests import file_sha256
from protocol.errors import FailedPrecondition, NotFound, VerificationFailed
from protocol.provenance import TrainingRun, sign_expert
from protocol.signing import hash_model_files, root_digest
from site_agent.launch import LaunchSettings, local_processes
from site_agent.local_launcher import Launcher
from site_agent.supervisor import (
    EventCallback,
    Supervisor,
    SupervisorConfig,
    TickCallback,
    TrainingCommand,
)
from site_agent.workdir import Workdir


@dataclass(frozen=True)
class ExpertInputs:
    """The verified local files one expert trains from, with the assignment naming them."""

    assignment: SiteAssignment
    recipe: Path
    recipe_sha256: str
    shard: Path
    shard_sha256: str
    base_model: Path
    base_model_digest: str

    @property
    def expert_index(self) -> int:
        """The expert k this site trains."""
        return self.assignment.expert_index

    @property
    def assignment_digest(self) -> str:
        """The digest of the assignment, which the provenance cites."""
        return self.assignment.assignment_digest


def resolve_inputs(
    workdir: Workdir, assignment: SiteAssignment, base_model: Path | None
) -> ExpertInputs:
    """Finds and checks every file the assignment names; a mismatch stops with both digests.

    Args:
        workdir: The site's workdir (downloaded artifacts live in ``artifacts/``).
        assignment: The saved assignment (``workdir.assignment()``).
        base_model: The site's own copy of the base, for bases the coordinator does not serve.
    """
    document = assignment.assignment
    root = workdir.artifacts_dir

    def artifact(name: str) -> tuple[Path, str]:
        expected = assignment.artifact(name).sha256
        path = root / name
        if not path.is_file():
            raise NotFound(f"{path}: missing; run `site-agent join` to download the artifacts")
        actual = file_sha256(path)
        if actual != expected:
            raise VerificationFailed(f"{path}: expected sha256 {expected}, got {actual}")
        return path, actual

    recipe_info = document.recipe
    recipe, recipe_sha256 = artifact(recipe_info.artifact)
    if recipe_sha256 != recipe_info.sha256:
        raise VerificationFailed(
            f"{recipe}: expected recipe sha256 {recipe_info.sha256}, got {recipe_sha256}"
        )
    shard, shard_sha256 = artifact(document.shard_artifact)

    base_info = document.base_model
    if base_info.served:
        base_dir = root / "base"
    elif base_model is None:
        raise FailedPrecondition(
            "this federation's base model is not served by the coordinator: pass "
            "--base-model PATH (your local copy; its digest must be "
            f"{base_info.digest})"
        )
    else:
        base_dir = base_model
    if not base_dir.is_dir():
        raise NotFound(f"base model {base_dir}: not a directory")
    digest = root_digest(hash_model_files(base_dir))
    if digest != base_info.digest:
        raise VerificationFailed(
            f"base model {base_dir}: expected digest {base_info.digest}, got {digest} "
            "(a different checkpoint than the federation's)"
        )
    return ExpertInputs(
        assignment=assignment,
        recipe=recipe,
        recipe_sha256=recipe_sha256,
        shard=shard,
        shard_sha256=shard_sha256,
        base_model=base_dir,
        base_model_digest=digest,
    )


def run_directory(workdir: Workdir) -> Path:
    return workdir.root / "run"


def train(
    workdir: Workdir,
    inputs: ExpertInputs,
    image_root: Path | None,
    config: SupervisorConfig | None = None,
    on_event: EventCallback | None = None,
    on_tick: TickCallback | None = None,
    supervisor_ready: Any = None,
    launch: LaunchSettings | None = None,
) -> dict[str, Any] | None:
    """Runs the supervised trainer to the end (resuming any earlier run); returns its ``done``
    event, or None when stopped. ``supervisor_ready(supervisor)`` lets a caller keep a handle
    to stop it. ``launch`` says how many ranks train, here or as a Slurm job."""
    launch = launch or LaunchSettings()
    config = config or SupervisorConfig()
    command = TrainingCommand(
        recipe=inputs.recipe,
        shard=inputs.shard,
        output=run_directory(workdir),
        image_root=image_root,
        base_model=inputs.base_model,
        processes=local_processes(launch) if launch.launcher == "local" else 1,
    )
    launcher: Launcher | None = None
    if launch.launcher == "slurm":
        from site_agent.slurm import SlurmLauncher

        launcher = SlurmLauncher(
            command, launch, config.stop_grace_seconds, template=launch.slurm.template
        )
    supervisor = Supervisor(command, config, on_event=on_event, on_tick=on_tick, launcher=launcher)
    if supervisor_ready is not None:
        supervisor_ready(supervisor)
    return supervisor.run()


def sign(
    workdir: Workdir,
    inputs: ExpertInputs,
    done: dict[str, Any],
    started_on: datetime,
    invocation_id: str | None = None,
) -> Path:
    """Signs the trained checkpoint in place with the site's key; returns its directory."""
    model_dir = Path(done["model_dir"])
    if not model_dir.is_dir():
        raise NotFound(f"trained model {model_dir}: not a directory")
    run = TrainingRun(
        expert_index=inputs.expert_index,
        assignment_digest=inputs.assignment_digest,
        recipe_digest=inputs.recipe_sha256,
        base_model_digest=inputs.base_model_digest,
        shard_manifest_digest=inputs.shard_sha256,
        atoll_version=version("atoll"),
        invocation_id=invocation_id or uuid.uuid4().hex,
        started_on=started_on,
        finished_on=datetime.now(UTC),
        steps=int(done.get("step", 0)),
        final_loss=float(done.get("final_loss", 0.0)),
        gpus=tuple(done.get("gpus", ())),
        processes=done.get("processes"),
        nodes=done.get("nodes"),
    )
    sign_expert(
        model_dir,
        run,
        private_key_path=workdir.key,
        certificate_path=workdir.cert,
        ca_path=workdir.ca,
    )
    return model_dir
