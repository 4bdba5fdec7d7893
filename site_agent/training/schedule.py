"""How many optimizer steps an expert takes, and with what batch.

The paper compute-matches each expert to the dense baseline: an expert sees ~1/K of the data
but takes the dense run's number of optimizer steps, with a global batch ~K times smaller
("we halve the per-device batch size" for LLaVA, "we halve the number of gradient accumulation
steps" for InternVL, K = 2). :func:`plan_schedule` does that arithmetic for any K, shard size
and number of devices, and returns every number it used so the run can record it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from protocol.errors import InvalidArgument
from protocol.recipe import ScheduleMode, TrainingSettings

__all__ = ["Schedule", "plan_schedule"]


@dataclass(frozen=True)
class Schedule:
    """The resolved schedule of one expert's run (recorded in ``run.json``).

    Attributes:
        mode: The recipe's ``training.schedule``.
        num_experts: K, from the shard manifest.
        shard_samples: Training samples in this expert's shard.
        dense_samples: Samples the dense run would see (all shards together).
        dense_samples_source: ``"manifest"`` when the manifest gave it, else ``"K x shard"``.
        dense_steps: Optimizer steps of the dense run (None in as-given mode).
        world_size: Data-parallel processes at this site.
        per_device_batch_size: Samples per device per micro-step.
        gradient_accumulation_steps: Micro-steps per optimizer step.
        global_batch_size: Samples per optimizer step at this site.
        total_steps: Optimizer steps this run takes.
        epochs: Passes over the shard those steps amount to.
        max_steps_override: True when the recipe's ``max_steps`` replaced the computed total.
    """

    mode: str
    num_experts: int
    shard_samples: int
    dense_samples: int
    dense_samples_source: str
    dense_steps: int | None
    world_size: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    total_steps: int
    epochs: float
    max_steps_override: bool

    def to_json(self) -> dict[str, Any]:
        """The schedule as a JSON-ready mapping."""
        return asdict(self)


def plan_schedule(
    settings: TrainingSettings,
    *,
    shard_samples: int,
    num_experts: int,
    world_size: int = 1,
    dense_samples: int | None = None,
) -> Schedule:
    """Resolves per-device batch, gradient accumulation and total steps for one expert.

    Args:
        settings: The recipe's training section (dense-run batch settings).
        shard_samples: Number of usable training samples in this expert's shard.
        num_experts: K, the number of experts in the federation.
        world_size: Data-parallel processes at this site (torchrun's WORLD_SIZE).
        dense_samples: Samples in the whole data set, when the shard manifest records it;
            otherwise the dense run is taken to be K shards of this size.

    Raises:
        InvalidArgument: the shard is empty or K / world size are not positive.
    """
    if shard_samples < 1:
        raise InvalidArgument("shard: no usable training samples")
    if num_experts < 1:
        raise InvalidArgument(f"shard num_experts: expected at least 1, got {num_experts}")
    if world_size < 1:
        raise InvalidArgument(f"world size: expected at least 1, got {world_size}")
    source = "manifest" if dense_samples is not None else "K x shard"
    dense_total = dense_samples if dense_samples is not None else num_experts * shard_samples

    per_device = settings.per_device_batch_size
    accumulation = settings.gradient_accumulation_steps
    dense_steps: int | None = None
    if settings.schedule is ScheduleMode.MATCH_DENSE_STEPS:
        dense_steps = max(1, math.ceil(dense_total * settings.epochs / settings.global_batch_size))
        # The global batch that spreads this shard's epochs over exactly dense_steps steps.
        wanted = shard_samples * settings.epochs / dense_steps
        if settings.scale == "per-device-batch":
            # The recipe's per-device batch is what fits in one device's memory: shrink it (the
            # paper's K = 2 halving on the dense run's devices), and when this site has fewer
            # devices than that, accumulate gradients rather than overflow memory.
            accumulation = max(1, math.ceil(wanted / (world_size * per_device)))
            per_device = max(1, round(wanted / (world_size * accumulation)))
        else:
            accumulation = max(1, round(wanted / (world_size * per_device)))
        total_steps = dense_steps
    global_batch = world_size * per_device * accumulation
    if settings.schedule is ScheduleMode.AS_GIVEN:
        total_steps = max(1, math.ceil(shard_samples * settings.epochs / global_batch))
    override = settings.max_steps is not None
    if settings.max_steps is not None:
        total_steps = settings.max_steps
    return Schedule(
        mode=settings.schedule.value,
        num_experts=num_experts,
        shard_samples=shard_samples,
        dense_samples=dense_total,
        dense_samples_source=source,
        dense_steps=dense_steps,
        world_size=world_size,
        per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        global_batch_size=global_batch,
        total_steps=total_steps,
        epochs=total_steps * global_batch / shard_samples,
        max_steps_override=override,
    )
