"""One expert's training run: Hugging Face Trainer, resumable, reporting JSON-line progress.

A run owns one output directory::

    OUTPUT/
      run.json          what this run is (recipe, shard and base identity), its resolved
                        schedule and data statistics, and, once done, its result
      checkpoints/      checkpoint-<step>/ (model, optimizer, scheduler, RNG, trainer state);
                        the last ``training.keep_last_checkpoints`` are kept
      model/            the final ``save_pretrained`` directory (safetensors, sharded above
                        ``training.max_shard_size``; a LoRA run saves its adapter) + processor

Restarted with ``resume=True`` the run continues from the newest *complete* checkpoint with the
same global step, optimizer, scheduler and RNG state, so the final weights match an
uninterrupted run. A checkpoint cut short by a crash (no readable trainer state) is removed.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from protocol.errors import FailedPrecondition
from protocol.recipe import Recipe
from site_agent.training import parallelize
from site_agent.training.data import (
    DataStats,
    ShardManifest,
    build_dataset,
    collate,
    verify_shard,
)
from site_agent.training.model import (
    check_model_directory,
    count_parameters,
    is_projector_parameter,
    load_model,
    load_processor,
)
from site_agent.training.progress_log import CHECKPOINT_PREFIX, ProgressLog, ProgressReporter
from site_agent.training.schedule import Schedule, plan_schedule

__all__ = [
    "TrainingJob",
    "TrainingStopped",
    "last_complete_checkpoint",
    "run_training",
]

RUN_FORMAT = "atoll.training-run.v1"


class _ExpertTrainer(Trainer):
    """The stock Trainer, plus a separate learning rate for the multimodal projector.

    LLaVA-1.5's LoRA recipe trains the adapters at 2e-4 but the projector at 2e-5
    (``mm_projector_lr``); with ``training.projector_learning_rate`` unset this is the stock
    optimizer.
    """

    def __init__(self, *args: Any, projector_learning_rate: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.projector_learning_rate = projector_learning_rate

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.projector_learning_rate is None or getattr(self, "optimizer", None) is not None:
            stock: torch.optim.Optimizer = super().create_optimizer(model)
            return stock
        target = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(target))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in target.named_parameters():
            if parameter.requires_grad:
                key = (name in decay, is_projector_parameter(name))
                groups.setdefault(key, []).append(parameter)
        parameter_groups = []
        for (decays, projector), parameters in sorted(groups.items()):
            group: dict[str, Any] = {
                "params": parameters,
                "weight_decay": self.args.weight_decay if decays else 0.0,
            }
            if projector:
                group["lr"] = self.projector_learning_rate
            parameter_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
        optimizer: torch.optim.Optimizer = optimizer_cls(parameter_groups, **optimizer_kwargs)
        self.optimizer = optimizer
        return optimizer

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        # transformers 5.x writes checkpoints with save_pretrained, which renames LLaVA's and
        # InternVL's weights to their original checkpoint names, but reads them back with a
        # plain load_state_dict(strict=False): every weight is silently skipped and the run
        # "resumes" from the initial weights. from_pretrained knows the renaming; load through
        # it, strictly. (peft adapters and DeepSpeed checkpoints take their own paths.)
        from transformers import PreTrainedModel

        target = self.model if model is None else model
        if not isinstance(target, PreTrainedModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        restored = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(restored.state_dict(), strict=True)
        del restored


class TrainingStopped(Exception):
    """Training stopped early on request (SIGTERM) after saving a checkpoint to resume from."""


class _StopOnSigterm(TrainerCallback):
    """SIGTERM (the supervisor's stop, a Slurm preemption): finish the optimizer step under way,
    save a regular checkpoint at that clean step boundary, and stop, instead of dying and
    losing up to ``save_steps`` steps.

    Under torchrun the ranks see the signal at different moments; after every optimizer step
    they agree (one all-reduce of a flag) whether any rank has it, so all of them save the
    same step and stop together.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnSigterm:
        self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if parallelize.any_rank(self.requested, args.device):
            control.should_save = True
            control.should_training_stop = True


@dataclass(frozen=True)
class TrainingJob:
    """Everything one run needs, already parsed and validated.

    Attributes:
        recipe: The validated recipe.
        recipe_sha256: Digest of the recipe file's bytes.
        recipe_dir: Directory of the recipe file (DeepSpeed paths are relative to it).
        shard: The expert's shard manifest.
        image_root: Directory the shard's image paths are relative to.
        output: The run's output directory.
        base_model: Local base checkpoint, or None for a tiny ``init-from-config`` base.
        resume: Continue from the newest complete checkpoint in ``output``.
    """

    recipe: Recipe
    recipe_sha256: str
    recipe_dir: Path
    shard: ShardManifest
    image_root: Path | None
    output: Path
    base_model: Path | None = None
    resume: bool = False

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (a resumed output directory must match it)."""
        return {
            "recipe_sha256": self.recipe_sha256,
            "shard_sha256": self.shard.sha256,
            "expert": self.shard.expert,
            "base_model": str(self.base_model.resolve()) if self.base_model else None,
        }


def _checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written; removes ones cut short.

    The Trainer writes ``trainer_state.json`` last, so a checkpoint without a readable one was
    interrupted (e.g. ``kill -9`` while saving) and cannot be resumed from.
    """
    if not checkpoints.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for path in checkpoints.iterdir():
        step = _checkpoint_step(path)
        if step is None or not path.is_dir():
            continue
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            complete = state.get("global_step") == step
        except (OSError, ValueError):
            complete = False
        if not complete:
            shutil.rmtree(path, ignore_errors=True)
        elif best is None or step > best[0]:
            best = (step, path)
    return best[1] if best else None


def _prepare_output(job: TrainingJob) -> tuple[Path | None, dict[str, Any] | None]:
    """Checks the output directory belongs to this run; returns (checkpoint, previous run)."""
    run_file = job.output / "run.json"
    previous = json.loads(run_file.read_text()) if run_file.is_file() else None
    if previous is not None and previous.get("identity") != job.identity():
        raise FailedPrecondition(
            f"output {job.output} holds a run of another recipe, shard or base "
            f"(run.json identity {previous.get('identity')}, this run {job.identity()}); "
            "use a fresh output directory"
        )
    checkpoint = last_complete_checkpoint(job.output / "checkpoints")
    if checkpoint is not None and not job.resume:
        raise FailedPrecondition(
            f"output {job.output} already has {checkpoint.name}; pass --resume to continue it, "
            "or use a fresh output directory"
        )
    return checkpoint, previous


def _write_json(path: Path, value: dict[str, Any]) -> None:
    # Write then rename: a crash never leaves a half-written run.json behind.
    partial_path = path.with_suffix(".json.partial")
    partial_path.write_text(json.dumps(value, indent=2) + "\n")
    partial_path.replace(path)


def _training_arguments(
    job: TrainingJob,
    schedule: Schedule,
    device: str,
    bf16: bool,
    deepspeed: dict[str, Any] | None,
) -> TrainingArguments:
    settings = job.recipe.training
    return TrainingArguments(
        output_dir=str(job.output / "checkpoints"),
        per_device_train_batch_size=schedule.per_device_batch_size,
        gradient_accumulation_steps=schedule.gradient_accumulation_steps,
        max_steps=schedule.total_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        bf16=bf16,
        use_cpu=device == "cpu",
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.keep_last_checkpoints,
        dataloader_num_workers=settings.dataloader_num_workers,
        remove_unused_columns=False,  # pixel_values must reach the model
        include_num_input_tokens_seen="non_padding",
        deepspeed=deepspeed,
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
    )


def _save_final_model(trainer: Trainer, processor: Any, job: TrainingJob) -> Path:
    """``save_pretrained`` into ``OUTPUT/model``, atomically (a partial directory, then rename)."""
    final = job.output / "model"
    staging = job.output / "model.partial"
    # Gathers ZeRO-3 partitions; a plain state_dict otherwise. Every rank must take part.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.args.should_save:
        return final
    shutil.rmtree(staging, ignore_errors=True)
    model: Any = trainer.accelerator.unwrap_model(trainer.model)
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(staging, state_dict=state_dict)
    else:
        model.save_pretrained(
            staging, state_dict=state_dict, max_shard_size=job.recipe.training.max_shard_size
        )
    processor.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def _plan(job: TrainingJob, shard_size: int) -> Schedule:
    num_experts = job.shard.num_experts
    if num_experts is None:
        if job.recipe.training.schedule.value == "match-dense-steps":
            raise FailedPrecondition(
                f"shard manifest {job.shard.path.name}: num_experts is missing; "
                "training.schedule 'match-dense-steps' needs K to match the dense run's steps"
            )
        num_experts = 1
    return plan_schedule(
        job.recipe.training,
        shard_samples=shard_size,
        num_experts=num_experts,
        world_size=parallelize.world_size(),
        dense_samples=job.shard.dataset_samples,
    )


def run_training(job: TrainingJob, progress: ProgressLog) -> Path:
    """Trains one expert: verify data, build, train (or resume), save.

    Args:
        job: The validated inputs.
        progress: Where progress events go.

    Returns:
        The final model directory (``OUTPUT/model``).

    Raises:
        AtollError: bad input (named precisely) or an output directory of another run.
    """
    recipe = job.recipe
    job.output.mkdir(parents=True, exist_ok=True)
    checkpoint, previous = _prepare_output(job)
    final = job.output / "model"
    if job.resume and previous and previous.get("result") and final.is_dir():
        # Finished before (e.g. the supervisor restarted after the last save): nothing to do.
        progress.emit("done", model_dir=str(final), **previous["result"])
        return final
    if job.base_model is not None:
        check_model_directory(job.base_model)  # seconds, before hashing a shard's images
    device = parallelize.resolve_device(recipe.training)
    bf16 = parallelize.uses_bf16(recipe.training, device)
    deepspeed = parallelize.deepspeed_config(recipe.training, job.recipe_dir, device)
    parallelize.init_distributed(device)
    launch = parallelize.launch_facts(device)

    progress.emit("phase", phase="verifying-data")
    # Once per site: the images are the same files for every rank (and node: shared storage).
    images_checked = parallelize.on_main_process(
        lambda: verify_shard(job.shard, job.image_root, recipe.data.verify_workers)
    )
    progress.emit("phase", phase="preparing-data")
    processor = load_processor(recipe.model, job.base_model)
    dataset, stats = build_dataset(
        job.shard, job.image_root, processor, recipe.model.architecture, recipe.data
    )
    schedule = _plan(job, len(dataset))
    # TrainingArguments before the model: with ZeRO-3 it makes from_pretrained load partitioned.
    arguments = _training_arguments(job, schedule, device, bf16, deepspeed)

    progress.emit("phase", phase="building-model")
    # DeepSpeed keeps fp32 master weights itself, so its model can load in bf16.
    dtype = torch.bfloat16 if bf16 and deepspeed is not None else torch.float32
    model = load_model(recipe.model, job.base_model, processor, dtype)
    model = parallelize.prepare_model(model, recipe.model)
    trainable, total = count_parameters(model)
    record = _run_record(job, schedule, stats, images_checked, device, bf16, trainable, total)
    record["launch"] = launch
    if parallelize.is_main_process():
        _write_json(job.output / "run.json", record)

    reporter = ProgressReporter(progress)
    stop = _StopOnSigterm()
    tokenizer = getattr(processor, "tokenizer", processor)
    trainer = _ExpertTrainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id),
        callbacks=[reporter, stop],
        projector_learning_rate=recipe.training.projector_learning_rate,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    progress.emit(
        "start",
        total_steps=schedule.total_steps,
        resumed_from=str(checkpoint) if checkpoint else None,
        schedule=schedule.to_json(),
        data=stats.to_json(),
        device=device,
        bf16=bf16,
        launch=launch,
    )
    progress.emit("phase", phase="training")
    started = time.monotonic()
    with stop:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if output.global_step < schedule.total_steps:
        parallelize.barrier()  # no rank exits while another still writes the checkpoint
        saved = job.output / "checkpoints" / f"{CHECKPOINT_PREFIX}{output.global_step}"
        progress.emit("stopped", step=int(output.global_step), checkpoint=str(saved))
        raise TrainingStopped(f"stopped at step {output.global_step}; resume with --resume")

    progress.emit("phase", phase="saving")
    final = _save_final_model(trainer, processor, job)
    result = {
        "step": int(output.global_step),
        "total_steps": schedule.total_steps,
        "final_loss": reporter.last_loss,
        "mean_loss": _finite(output.training_loss),
        "seconds": round(time.monotonic() - started, 2),
        "processes": launch["processes"],
        "nodes": launch["nodes"],
        "gpus": launch["gpus"],
    }
    if parallelize.is_main_process():
        _write_json(job.output / "run.json", {**record, "result": result})
    progress.emit("done", model_dir=str(final), **result)
    return final


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _run_record(
    job: TrainingJob,
    schedule: Schedule,
    stats: DataStats,
    images_checked: int,
    device: str,
    bf16: bool,
    trainable: int,
    total: int,
) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "identity": job.identity(),
        "recipe": job.recipe.model_dump(mode="json"),
        "num_experts": job.shard.num_experts,
        "schedule": schedule.to_json(),
        "data": {**stats.to_json(), "images_verified": images_checked},
        "device": device,
        "bf16": bf16,
        "parameters": {"trainable": trainable, "total": total},
        "torch": torch.__version__,
    }
