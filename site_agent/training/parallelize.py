"""Where the model runs and how it is wrapped: device, precision, ranks, LoRA (peft), DeepSpeed.

Kept apart from the training loop (torchtitan's ``parallelize``): the loop receives a model that
is already frozen and wrapped, and a DeepSpeed config it hands to the Trainer unchanged.
DeepSpeed is only imported on CUDA sites; the CPU path never touches it.

Under torchrun (``WORLD_SIZE`` > 1) :func:`init_distributed` joins the ranks' process group
(gloo on CPU, nccl on CUDA) before anything collective; the HF Trainer, accelerate and DeepSpeed
then use that group. The trainer never knows whether torchrun ran on one node or under Slurm.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from protocol.errors import AtollError, FailedPrecondition, InvalidArgument, NotFound
from protocol.recipe import Architecture, ModelSettings, TrainingSettings
from site_agent.training.model import (
    freeze_parameters,
    language_model_lora_targets,
)

__all__ = [
    "any_rank",
    "apply_lora",
    "barrier",
    "deepspeed_config",
    "init_distributed",
    "is_main_process",
    "launch_facts",
    "local_rank",
    "on_main_process",
    "prepare_model",
    "resolve_device",
    "uses_bf16",
    "world_size",
]

T = TypeVar("T")


def resolve_device(settings: TrainingSettings) -> Literal["cpu", "cuda"]:
    """The device the recipe asks for, checked against what this machine has.

    Raises:
        FailedPrecondition: ``training.device: cuda`` on a machine where CUDA is unavailable.
    """
    available = torch.cuda.is_available()
    if settings.device == "cuda" and not available:
        built = torch.version.cuda
        reason = (
            f"this torch build has CUDA {built} but no GPU is visible (check the driver and "
            "CUDA_VISIBLE_DEVICES)"
            if built
            else f"this torch build ({torch.__version__}) has no CUDA support"
        )
        raise FailedPrecondition(
            f"recipe training.device is 'cuda', but CUDA is not available: {reason}. "
            "Run on a GPU machine, or set training.device to 'cpu' or 'auto'."
        )
    if settings.device == "cpu" or not available:
        return "cpu"
    return "cuda"


def uses_bf16(settings: TrainingSettings, device: str) -> bool:
    """Whether to train in bf16 mixed precision (``auto``: on GPUs that support it).

    Raises:
        FailedPrecondition: ``training.precision: bf16`` where the device cannot do it.
    """
    if settings.precision == "fp32":
        return False
    supported = device == "cuda" and torch.cuda.is_bf16_supported()
    if settings.precision == "bf16" and not supported:
        raise FailedPrecondition(
            f"recipe training.precision is 'bf16', but the {device} device here does not support "
            "bf16 training; set training.precision to 'auto' or 'fp32'"
        )
    return supported


def world_size() -> int:
    """Data-parallel processes at this site (torchrun sets WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes files and reports progress."""
    return int(os.environ.get("RANK", "0")) == 0


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: str) -> None:
    """Joins the process group of torchrun's ranks: nccl on CUDA (one device per rank, by
    LOCAL_RANK), gloo on CPU. Nothing to do for a single process or a group already joined."""
    if world_size() == 1 or dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")


def _distributed() -> bool:
    return world_size() > 1 and dist.is_initialized()


def barrier() -> None:
    """Waits for every rank (a no-op for a single process)."""
    if _distributed():
        dist.barrier()


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """Whether ``flag`` is set on any rank: every rank gets the same answer at the same call."""
    if not _distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def on_main_process(work: Callable[[], T]) -> T:
    """Runs ``work`` on rank 0 only and hands its result, or its domain error, to every rank.

    For work whose answer is the same for all ranks and costly to get (hashing a shard's
    images): done once per site, not once per rank. A rank-0 failure fails every rank alike,
    so none waits forever for the others.
    """
    if not _distributed():
        return work()
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if is_main_process():
        try:
            outcome[0] = ("ok", work())
        except AtollError as failure:
            error, outcome[0] = failure, ("error", failure)
        except BaseException as failure:
            error = failure
            outcome[0] = ("crash", f"rank 0 failed: {type(failure).__name__}: {failure}")
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if error is not None:
        raise error
    if kind == "error":
        raise value
    if kind == "crash":
        raise RuntimeError(value)
    result: T = value
    return result


def launch_facts(device: str) -> dict[str, Any]:
    """How many processes, nodes and devices train: for the run record and the provenance.

    ``devices`` names each rank's device in rank order (a GPU's model name, or ``cpu``);
    ``gpus`` is the same list on CUDA and empty on CPU.
    """
    name = torch.cuda.get_device_name(local_rank()) if device == "cuda" else "cpu"
    names: list[Any] = [name]
    if _distributed():
        names = [None] * world_size()
        dist.all_gather_object(names, name)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return {
        "processes": world_size(),
        "nodes": max(1, world_size() // max(1, per_node)),
        "devices": [str(n) for n in names],
        "gpus": [str(n) for n in names] if device == "cuda" else [],
    }


def deepspeed_config(
    settings: TrainingSettings, recipe_dir: Path, device: str
) -> dict[str, Any] | None:
    """Loads the recipe's DeepSpeed JSON for a CUDA run; None on CPU or when none is set.

    Args:
        settings: The recipe's training section (``deepspeed``: a path relative to the recipe).
        recipe_dir: Directory of the recipe file.
        device: The resolved device.

    Raises:
        NotFound: the JSON file does not exist.
        InvalidArgument: it is not a JSON object.
        FailedPrecondition: DeepSpeed is not installed on this CUDA site.
    """
    if settings.deepspeed is None or device != "cuda":
        # DeepSpeed's engine is for CUDA; CPU runs take the plain Trainer path of the same code.
        return None
    path = (recipe_dir / settings.deepspeed).resolve()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"recipe training.deepspeed: {path} does not exist") from None
    except ValueError as error:
        raise InvalidArgument(f"recipe training.deepspeed: {path} is not JSON ({error})") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"recipe training.deepspeed: {path}: expected a JSON object")
    if importlib.util.find_spec("deepspeed") is None:
        raise FailedPrecondition(
            "recipe training.deepspeed is set but DeepSpeed is not installed; "
            "install it with: pip install 'atoll[cuda]'"
        )
    return config


def apply_lora(model: nn.Module, settings: ModelSettings) -> nn.Module:
    """Wraps ``model`` in peft LoRA adapters as the recipe's ``model.lora`` says.

    The language model's base weights freeze; the projector keeps training in full (LLaVA-1.5's
    LoRA recipe) unless ``model.freeze.projector`` is set, and is saved with the adapter.
    """
    from peft import LoraConfig, get_peft_model

    lora = settings.lora
    assert lora is not None
    targets = lora.target_modules or language_model_lora_targets(settings.architecture)
    keep_projector = (
        settings.architecture is not Architecture.CAUSAL_LM and not settings.freeze.projector
    )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=["multi_modal_projector"] if keep_projector else None,
        task_type="CAUSAL_LM",
    )
    wrapped: nn.Module = get_peft_model(model, config)
    return wrapped


def prepare_model(model: nn.Module, settings: ModelSettings) -> nn.Module:
    """Freezes the recipe's parts, adds LoRA, and readies gradient checkpointing.

    Raises:
        InvalidArgument: nothing is left to train.
    """
    freeze_parameters(model, settings.architecture, settings.freeze)
    if settings.lora is not None:
        model = apply_lora(model, settings)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(  # type: ignore[operator]
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        if settings.lora is not None or settings.freeze.vision_tower:
            # Checkpointed blocks need an input that requires grad when the first layers are
            # frozen, or no gradient reaches the adapters.
            model.enable_input_require_grads()  # type: ignore[operator]
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidArgument("model.freeze: every parameter is frozen; nothing would train")
    return model
