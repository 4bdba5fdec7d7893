"""The site agent: enrol once, then loop — assignment, artifacts, heartbeats.

State lives in the workdir, so re-running `site-agent join` resumes: no second enrolment, no
second download of a verified artifact, the same expert slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol.assignment import SiteAssignment, parse_assignment, parse_site_assignment
from protocol.client import Credentials, FederationClient, enrol_with_token
from protocol.download import download_artifact
from protocol.errors import (
    AtollError,
    FailedPrecondition,
    Interrupted,
    InvalidArgument,
    PermissionDenied,
    VerificationFailed,
)
from protocol.messages import ArtifactRef, AssignmentStatus, Directive, Heartbeat
from protocol.retry import Retry
from site_agent import expert, renewal
from site_agent.images import ImagesReady, prepare_images
from site_agent.launch import LaunchSettings
from site_agent.supervisor import Supervisor, SupervisorConfig
from site_agent.transfer import signed_manifest, upload_directory
from site_agent.workdir import SiteIdentity, Workdir

log = logging.getLogger("atoll.site")


def enrol(
    workdir: Workdir,
    address: str,
    token_text: str,
    enrol_address: str | None = None,
    retry: Retry | None = None,
) -> SiteIdentity:
    """Creates the site key, pins the coordinator's CA from the token and enrols with a CSR.

    ``address`` is the coordinator's mutual-TLS address (kept for every later call); enrolment
    itself goes to ``enrol_address`` (default: the next port).
    """
    credentials = Credentials(key=workdir.key, cert=workdir.cert, ca=workdir.ca)
    token, result = enrol_with_token(credentials, address, token_text, enrol_address, retry)
    identity = SiteIdentity(address, result.federation, token.site, result.spiffe_id)
    workdir.save_identity(identity)
    log.info("[site] enrolled as %s", identity.spiffe_id)
    return identity


def connect(
    workdir: Workdir, address: str | None = None, retry: Retry | None = None
) -> FederationClient:
    """A mutual-TLS client from the workdir's certificate (``address`` overrides site.json)."""
    identity = workdir.identity()
    return FederationClient(
        address or identity.coordinator,
        identity.federation,
        workdir.ca.read_bytes(),
        key_pem=workdir.key.read_bytes(),
        cert_pem=workdir.cert.read_bytes(),
        retry=retry,
    )


@dataclass
class Agent:
    """The join loop: assignment, artifacts, supervised training, signing, upload.

    Each phase is saved in the workdir, so a restarted agent continues where it stopped (the
    trainer resumes from its last checkpoint). ``stop`` ends the loop between steps.
    """

    workdir: Workdir
    client: FederationClient | None  # None: an offline site (train and sign, no upload)
    progress: bool = False
    image_root: Path | None = None
    base_model: Path | None = None
    supervisor_config: SupervisorConfig | None = None
    launch: LaunchSettings | None = None  # ranks, here or as a Slurm job (default: all GPUs)
    stop: threading.Event = field(default_factory=threading.Event)
    phase: str = "waiting"
    heartbeat_seconds: float = 10.0
    message: str = ""
    until: str | None = None  # stop (successfully) once this phase is reached
    _training: dict[str, Any] = field(default_factory=dict)
    _supervisor: Supervisor | None = None
    _next_beat: float = 0.0

    def _save(self, **extra: Any) -> None:
        state = self.workdir.agent_state()
        state.update(phase=self.phase, message=self.message, updated_at=time.time(), **extra)
        self.workdir.save_agent_state(state)

    def _set_phase(self, phase: str, message: str = "", **extra: Any) -> None:
        if phase != self.phase:
            log.info("[site] phase %s -> %s %s", self.phase, phase, message)
        self.phase, self.message = phase, message
        self._save(**extra)

    def halt(self) -> None:
        """Stops the loop and, when training, the trainer (after it saves a checkpoint)."""
        self.stop.set()
        if self._supervisor is not None:
            self._supervisor.stop()

    def renew_if_due(self) -> None:
        """Renews the site certificate once a third of its lifetime is left (see
        :mod:`site_agent.renewal`) and moves to a channel that presents the new one."""
        if self.client is None or not renewal.due(self.workdir.cert.read_bytes()):
            return
        try:
            renewal.renew(self.workdir, self.client)
        except (PermissionDenied, VerificationFailed, InvalidArgument) as error:
            # The current certificate still works until it expires; the heartbeat that
            # follows carries the coordinator's answer (a revoked site is refused there).
            log.warning("[site] certificate renewal refused: %s", error)
            return
        old = self.client
        self.client = connect(self.workdir, old.address, retry=old.retry)
        old.close()

    def interrupt(self) -> None:
        """What SIGTERM/SIGINT do: :meth:`halt`, and a call in flight or a wait to retry
        one ends at once (it raises Interrupted)."""
        self.halt()
        if self.client is not None:
            self.client.interrupt()

    def reached(self) -> bool:
        """Whether the loop should end here: stopped, or at the ``until`` phase."""
        return self.stop.is_set() or (self.until is not None and self.phase == self.until)

    @contextmanager
    def beating(self) -> Iterator[None]:
        """Heartbeats from a thread of their own while the body runs (an upload), so the
        coordinator sees "uploading", not a site silent since training."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(self.heartbeat_seconds):
                try:
                    self.beat(renew=False)
                except AtollError as error:
                    log.warning("[site] heartbeat during upload failed: %s", error)

        thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=1.0)  # a beat still retrying ends with the process

    def beat(self, renew: bool = True) -> Directive:
        if self.client is None:
            return Directive.CONTINUE
        if renew:  # not from the upload's heartbeat thread: the upload holds this client
            self.renew_if_due()
        t = self._training
        reply = self.client.heartbeat(
            Heartbeat(
                phase=self.phase,
                step=int(t.get("step", 0)),
                total_steps=int(t.get("total_steps", 0)),
                loss=float(t.get("loss", 0.0)),
                tokens_per_second=float(t.get("tokens_per_second", 0.0)),
                eta_seconds=float(t.get("eta_seconds", 0.0)),
                message=self.message,
            )
        )
        self.heartbeat_seconds = float(reply.next_heartbeat_seconds or self.heartbeat_seconds)
        self._next_beat = time.monotonic() + self.heartbeat_seconds
        # Progress saved with each beat, so `site-agent status` shows it from another process.
        self._save(
            last_heartbeat=time.time(),
            step=int(t.get("step", 0)),
            total_steps=int(t.get("total_steps", 0)),
        )
        if reply.directive is Directive.STOP:
            log.warning("[site] coordinator directs: stop (%s)", reply.message)
            self.halt()
        return reply.directive

    def fetch_assignment(self) -> SiteAssignment | None:
        """The assignment (from the workdir, else the coordinator), or None while pending."""
        saved = self.workdir.assignment()
        if saved is not None or self.client is None:
            return saved
        reply = self.client.get_assignment()
        if reply.status is not AssignmentStatus.ASSIGNED:
            # Polled again after the next heartbeat: both calls are cheap and idempotent.
            self._set_phase("waiting", reply.reason)
            return None
        document = parse_assignment(reply.assignment_json, "the coordinator's assignment")
        # The reply's own fields repeat the document's; SiteAssignment checks they agree.
        assignment = parse_site_assignment(
            {
                "assignment": document.to_json(),
                "assignment_digest": reply.assignment_digest,
                "expert_index": reply.expert_index,
                "num_experts": reply.num_experts,
                "plan_digest": reply.plan_digest,
                "artifacts": [
                    {"name": a.name, "size": a.size, "sha256": a.sha256} for a in reply.artifacts
                ],
            },
            "the coordinator's assignment reply",
        )
        self.workdir.save_assignment(assignment)
        self._set_phase("assigned", f"expert {reply.expert_index} of {reply.num_experts}")
        return assignment

    def fetch_artifacts(self, assignment: SiteAssignment) -> None:
        assert self.client is not None
        refs = [ArtifactRef(a.name, a.size, a.sha256) for a in assignment.artifacts]
        self._set_phase("downloading", f"{len(refs)} artifact(s)")
        for ref in refs:
            download_artifact(self.client, ref, self.workdir.artifacts_dir, self.progress)
        if self.prepare_images(assignment).complete:
            self._set_phase("ready", f"expert {assignment.expert_index}: artifacts verified")

    def prepare_images(self, assignment: SiteAssignment) -> ImagesReady:
        """The shard's images: the site's own copy, completed from the coordinator."""
        shard = assignment.assignment.shard_artifact

        def tick(message: str) -> None:
            self.message = message
            self._on_training_tick()

        return prepare_images(
            self.workdir.artifacts_dir / shard,
            self.workdir.images_dir,
            self.image_root,
            self.client,
            progress=self.progress,
            stop=self.stop,
            tick=tick,
        )

    def _on_training_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ("start", "progress"):
            self._training.update({k: v for k, v in event.items() if k != "event"})
            if kind == "progress":
                self.message = f"step {event['step']}/{event['total_steps']}"
        elif kind == "restart":
            self.message = f"trainer restarted after {event['cause']}"
            log.warning("[site] %s", self.message)
        elif kind == "job":
            self.message = f"Slurm job {event['job_id']} {event['state']}"
            log.info("[site] %s (restarts %s)", self.message, event.get("restarts"))
        if time.monotonic() >= self._next_beat:
            self.beat()

    def _on_training_tick(self) -> None:
        if time.monotonic() >= self._next_beat:
            self.beat()

    def work(self, assignment: SiteAssignment) -> None:
        """Trains, signs and uploads this site's expert, resuming at the saved phase."""
        inputs = expert.resolve_inputs(self.workdir, assignment, self.base_model)
        state = self.workdir.agent_state()
        if self.phase in ("ready", "training"):
            images = self.prepare_images(assignment)
            if not images.complete:
                return  # stopped while fetching images
            started = state.get("training_started") or time.time()
            self._set_phase("training", "starting the trainer", training_started=started)
            done = expert.train(
                self.workdir,
                inputs,
                images.root,
                self.supervisor_config,
                on_event=self._on_training_event,
                on_tick=self._on_training_tick,
                supervisor_ready=lambda s: setattr(self, "_supervisor", s),
                launch=self.launch,
            )
            self._supervisor = None
            if done is None:
                return  # stopped; the trainer saved a checkpoint to resume from
            self._set_phase("signing", f"trained {done['step']} steps", training_done=done)
            state = self.workdir.agent_state()
        if self.reached():
            return
        if self.phase == "signing":
            started = datetime.fromtimestamp(float(state["training_started"]), UTC)
            expert.sign(self.workdir, inputs, state["training_done"], started)
            self._set_phase("uploading", "checkpoint signed")
        if self.reached():
            return
        if self.phase == "uploading" and self.client is not None:
            model_dir = Path(state["training_done"]["model_dir"])
            files = signed_manifest(model_dir)  # the digests model.sig already holds
            self.beat()
            with self.beating():
                result = upload_directory(
                    self.client, inputs.expert_index, model_dir, self.progress, files=files
                )
            if not result.accepted:
                self._set_phase("failed", f"upload rejected: {result.reason}")
                self.beat()
                raise VerificationFailed(f"the coordinator rejected the upload: {result.reason}")
            self._set_phase("done", "expert accepted", receipt=result.receipt_json)

    def step(self) -> Directive:
        """One pass: advance as far as the federation allows, then heartbeat. A failure (a
        shard image the site cannot get, a bad base model, ...) is reported to the coordinator
        before it is raised."""
        try:
            if self.phase in ("waiting", "assigned", "downloading"):
                assignment = self.fetch_assignment()
                if assignment is not None and not self.reached():
                    self.fetch_artifacts(assignment)
            if self.phase in ("ready", "training", "signing", "uploading") and not self.reached():
                assignment = self.workdir.assignment()
                assert assignment is not None
                self.work(assignment)
        except Interrupted:
            raise  # told to stop: nothing failed
        except AtollError as error:
            self._set_phase("failed", str(error)[:500])
            self.beat()
            raise
        return self.beat()

    def run(self, until: str | None = None) -> int:
        """Loops until done, stopped, directed to stop, or (``until``) a phase is reached.

        Returns 0 when done or at ``until``, 1 when the coordinator directs a stop; a signal
        (:meth:`halt`) raises Interrupted from whatever call or wait was in flight.
        """
        self.until = until
        saved = self.workdir.agent_state().get("phase")
        if saved in RESUMABLE and self.workdir.assignment() is not None:
            self.phase = saved
        while not self.stop.is_set():
            if until is not None and self.phase == until:
                return 0
            if self.step() is Directive.STOP:
                self._set_phase("failed", "stopped by the coordinator")
                return 1
            if self.phase == "done" or (until is not None and self.phase == until):
                return 0
            self.stop.wait(self.heartbeat_seconds)
        raise Interrupted("stopped by a signal")


# Phases a restarted agent resumes at (earlier ones are re-derived from the coordinator).
RESUMABLE = ("ready", "training", "signing", "uploading", "done")


def require_enrolled(workdir: Workdir) -> SiteIdentity:
    if not workdir.is_enrolled():
        raise FailedPrecondition(
            f"{workdir.root} is not enrolled: pass --token (from `coordinator invite`)"
        )
    return workdir.identity()
