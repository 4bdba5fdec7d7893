"""Real training runs of tiny models on CPU: the loss goes down, the result loads with plain
transformers / peft, a run killed with SIGKILL resumes to the same weights, and bad
situations (no CUDA, another run's directory) stop with a clear message."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from protocol.exit_codes import ExitCode
from protocol.recipe import load_recipe
from site_agent.training.model import load_model, load_processor, materialize_tiny_base
from site_agent.training.trainer import last_complete_checkpoint

from .synthetic import (
    REPO,
    Shard,
    read_events,
    run_entry_point,
    write_recipe,
    write_shard,
    write_text_shard,
)

pytestmark = pytest.mark.slow

# The same thread count as the in-process runs (see conftest), so results compare exactly.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

# Checkpoint every 5 of the 24 steps (32 samples, K = 2, dense global batch 8, 3 epochs).
LLAVA = {"training": {"save_steps": 5}}
INTERNVL = {
    "model": {"architecture": "internvl", "freeze": {"vision_tower": False}},
    "training": {"save_steps": 12},
}
CAUSAL = {
    "model": {"architecture": "causal-lm", "freeze": {"vision_tower": False}},
    "training": {"save_steps": 100, "max_shard_size": "100KB"},
}
LORA = {
    "model": {"base": "pretrained", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "tiny": None},
    "training": {"save_steps": 12, "learning_rate": 1.0e-2, "projector_learning_rate": 3.0e-3},
}


def _train(
    tmp: Path, name: str, overrides: dict[str, Any], shard: Shard, extra: list[str] | None = None
) -> tuple[Path, list[dict[str, Any]]]:
    recipe = write_recipe(tmp / f"{name}.yaml", overrides)
    output = tmp / f"run-{name}"
    arguments = ["--recipe", str(recipe), "--shard", str(shard.manifest), "--output", str(output)]
    arguments += ["--image-root", str(shard.image_root), *(extra or [])]
    code, events = run_entry_point(arguments, tmp / f"{name}.progress.jsonl")
    assert code == 0, events[-1:]
    return output, events


def _assert_resumes_exactly(
    tmp: Path, name: str, shard: Shard, weights: str, extra: list[str] | None = None
) -> None:
    """Resumes a copy of run ``name`` from its step-12 checkpoint: the same final weights."""
    finished, restarted = tmp / f"run-{name}", tmp / f"run-{name}-resumed"
    (restarted / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        finished / "checkpoints" / "checkpoint-12", restarted / "checkpoints" / "checkpoint-12"
    )
    shutil.copy(finished / "run.json", restarted / "run.json")
    arguments = ["--recipe", str(tmp / f"{name}.yaml"), "--shard", str(shard.manifest), "--resume"]
    arguments += ["--image-root", str(shard.image_root), "--output", str(restarted), *(extra or [])]
    code, events = run_entry_point(arguments, tmp / f"{name}-resumed.progress.jsonl")
    assert code == 0, events[-1:]
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(13, 25))
    expected = load_file(finished / "model" / weights)
    actual = load_file(restarted / "model" / weights)
    assert expected.keys() == actual.keys()
    assert all(torch.allclose(expected[k], actual[k], atol=1e-6) for k in expected)


def _losses(events: list[dict[str, Any]]) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "progress"]


def _assert_learns(events: list[dict[str, Any]], factor: float = 0.7) -> None:
    losses = _losses(events)
    assert len(losses) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < factor * first, losses


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def image_shard(tmp: Path) -> Shard:
    return write_shard(tmp / "shard")


@pytest.fixture(scope="module")
def llava_run(tmp: Path, image_shard: Shard) -> tuple[Path, list[dict[str, Any]]]:
    return _train(tmp, "llava", LLAVA, image_shard)


def test_tiny_llava_learns_and_loads(llava_run: tuple[Path, list[dict[str, Any]]]) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    output, events = llava_run
    _assert_learns(events)
    progress = next(e for e in events if e["event"] == "progress")
    assert set(progress) >= {"step", "total_steps", "loss", "tokens_per_second", "eta_seconds"}
    assert progress["total_steps"] == 24 and progress["tokens_per_second"] > 0
    start = next(e for e in events if e["event"] == "start")
    assert start["schedule"]["per_device_batch_size"] == 4  # the dense 8, halved for K = 2
    assert start["schedule"]["dense_steps"] == 24
    assert events[-1]["event"] == "done" and events[-1]["step"] == 24

    model = LlavaForConditionalGeneration.from_pretrained(output / "model")
    processor = AutoProcessor.from_pretrained(output / "model")
    assert (output / "model" / "model.safetensors").is_file()
    from PIL import Image

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(
        images=[Image.new("RGB", (40, 40), (220, 30, 30))], text=prompt, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


def test_vision_tower_stays_frozen_and_projector_trains(
    llava_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    from transformers import LlavaForConditionalGeneration

    output, _ = llava_run
    recipe, _ = load_recipe(REPO / "configs" / "tiny-cpu.yaml")
    base = load_model(recipe.model, None, load_processor(recipe.model, None)).state_dict()
    # (Compared as loaded: transformers may store the keys under the checkpoint's legacy names.)
    trained = LlavaForConditionalGeneration.from_pretrained(output / "model").state_dict()
    vision = [k for k in trained if k.startswith("model.vision_tower.")]
    projector = [k for k in trained if k.startswith("model.multi_modal_projector.")]
    assert vision and projector
    assert all(torch.equal(trained[k], base[k]) for k in vision)
    assert not all(torch.equal(trained[k], base[k]) for k in projector)


def test_tiny_internvl_learns_and_loads(tmp: Path, image_shard: Shard) -> None:
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    output, events = _train(tmp, "internvl", INTERNVL, image_shard)
    _assert_learns(events)
    InternVLForConditionalGeneration.from_pretrained(output / "model")
    AutoProcessor.from_pretrained(output / "model")
    _assert_resumes_exactly(tmp, "internvl", image_shard, "model.safetensors")


def test_tiny_causal_lm_learns_and_loads_from_shards(tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shard = write_text_shard(tmp / "text-shard", samples=32)
    output, events = _train(tmp, "causal", CAUSAL, shard)
    _assert_learns(events)
    assert (output / "model" / "model.safetensors.index.json").is_file()  # sharded at 100KB
    AutoModelForCausalLM.from_pretrained(output / "model")
    AutoTokenizer.from_pretrained(output / "model")


def test_lora_from_a_local_base_loads_with_peft(tmp: Path, image_shard: Shard) -> None:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    tiny, _ = load_recipe(REPO / "configs" / "tiny-cpu.yaml")
    base_dir = tmp / "tiny-base"
    materialize_tiny_base(tiny.model, base_dir)
    output, events = _train(tmp, "lora", LORA, image_shard, ["--base-model", str(base_dir)])
    # Adapters on a random base, with its embeddings and head frozen, learn slowly.
    _assert_learns(events, factor=0.9)
    adapter = output / "model"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()
    model = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(base_dir), adapter
    )
    names = [n for n, _ in model.named_parameters()]
    assert any("lora_A" in n for n in names)
    assert any("multi_modal_projector" in n and "modules_to_save" in n for n in names)
    assert not any("vision_tower" in n and "lora" in n for n in names)
    _assert_resumes_exactly(
        tmp, "lora", image_shard, "adapter_model.safetensors", ["--base-model", str(base_dir)]
    )


def _wait_for(
    progress: Path, process: subprocess.Popen[bytes], predicate: Any, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(predicate(e) for e in read_events(progress)):
            return
        assert process.poll() is None, "the trainer exited before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError(f"no matching progress within {timeout} s: {read_events(progress)[-3:]}")


def test_kill_9_then_resume_matches_an_uninterrupted_run(
    tmp: Path, image_shard: Shard, llava_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    reference, _ = llava_run
    recipe = tmp / "llava.yaml"  # the very recipe of the uninterrupted run
    output, progress = tmp / "run-killed", tmp / "killed.progress.jsonl"
    command = [
        sys.executable, "-m", "site_agent.training", "--recipe", str(recipe),
        "--shard", str(image_shard.manifest), "--image-root", str(image_shard.image_root),
        "--output", str(output), "--progress", str(progress),
    ]  # fmt: skip
    with (tmp / "killed.stderr").open("wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stderr=stderr, env=ONE_THREAD)
        try:
            # After the checkpoint at step 10, mid-way to the next one.
            _wait_for(
                progress,
                process,
                lambda e: e.get("step", 0) >= 12 and e["event"] == "progress",
                240,
            )
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = max(e["step"] for e in read_events(progress) if e["event"] == "progress")
    assert killed_at < 24

    resumed = subprocess.run(
        [*command, "--resume"], cwd=REPO, capture_output=True, timeout=300, env=ONE_THREAD
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    events = read_events(progress)
    start = [e for e in events if e["event"] == "start"][-1]
    resumed_from = Path(start["resumed_from"])
    step = int(resumed_from.name.removeprefix("checkpoint-"))
    assert step in (10, 15) and step <= killed_at
    after = events[events.index(start) :]
    assert [e["step"] for e in after if e["event"] == "progress"] == list(range(step + 1, 25))
    assert after[-1]["event"] == "done" and after[-1]["step"] == 24

    expected = load_file(reference / "model" / "model.safetensors")
    actual = load_file(output / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    worst = max(float((expected[k] - actual[k]).abs().max()) for k in expected)
    assert worst < 1e-5, f"largest weight difference {worst}"
    # Only the last checkpoints are kept.
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        "checkpoint-20",
        "checkpoint-24",
    ]


def test_sigterm_saves_a_checkpoint_and_stops_then_resume_matches(
    tmp: Path, image_shard: Shard, llava_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    reference, _ = llava_run
    output, progress = tmp / "run-stopped", tmp / "stopped.progress.jsonl"
    arguments = ["--recipe", str(tmp / "llava.yaml"), "--shard", str(image_shard.manifest)]
    arguments += ["--image-root", str(image_shard.image_root), "--output", str(output)]
    command = [sys.executable, "-m", "site_agent.training", *arguments, "--progress", str(progress)]
    with (tmp / "stopped.stderr").open("wb") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stderr=stderr, env=ONE_THREAD)
        try:
            _wait_for(progress, process, lambda e: e.get("step", 0) >= 7, 240)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == ExitCode.INTERRUPTED
        finally:
            process.kill()
    stopped = read_events(progress)[-1]
    assert stopped["event"] == "stopped" and 7 <= stopped["step"] < 24
    assert last_complete_checkpoint(output / "checkpoints") == Path(stopped["checkpoint"])
    assert not (output / "model").exists()

    code, events = run_entry_point([*arguments, "--resume"], progress)
    assert code == 0
    after = [e["step"] for e in events[events.index(stopped) :] if e["event"] == "progress"]
    assert after == list(range(stopped["step"] + 1, 25))
    expected = load_file(reference / "model" / "model.safetensors")
    actual = load_file(output / "model" / "model.safetensors")
    assert all(torch.allclose(expected[k], actual[k], atol=1e-6) for k in expected)


def test_finished_run_resumed_again_reports_done_without_training(
    tmp: Path, image_shard: Shard, llava_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    output, _ = llava_run
    arguments = ["--recipe", str(tmp / "llava.yaml"), "--shard", str(image_shard.manifest)]
    arguments += ["--image-root", str(image_shard.image_root), "--output", str(output), "--resume"]
    code, events = run_entry_point(arguments, tmp / "again.progress.jsonl")
    assert code == 0
    assert [e["event"] for e in events] == ["done"] and events[0]["step"] == 24


def test_output_of_another_run_or_without_resume_is_refused(
    tmp: Path,
    image_shard: Shard,
    llava_run: tuple[Path, list[dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    output, _ = llava_run
    other = write_recipe(tmp / "other.yaml", {"training": {"seed": 7}})
    base = [
        "--shard",
        str(image_shard.manifest),
        "--image-root",
        str(image_shard.image_root),
        "--output",
        str(output),
    ]
    code, events = run_entry_point(["--recipe", str(other), *base, "--resume"], tmp / "other.jsonl")
    assert code == ExitCode.PRECONDITION
    assert (
        events[-1]["event"] == "error" and "another recipe, shard or base" in events[-1]["message"]
    )
    code, events = run_entry_point(
        ["--recipe", str(tmp / "llava.yaml"), *base], tmp / "again.jsonl"
    )
    assert code == ExitCode.PRECONDITION and "pass --resume" in events[-1]["message"]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_requested_without_cuda_is_a_clear_error(
    tmp_path: Path, shard: Shard, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path / "cuda.yaml", {"training": {"device": "cuda"}})
    arguments = [
        "--recipe",
        str(recipe),
        "--shard",
        str(shard.manifest),
        "--output",
        str(tmp_path / "out"),
    ]
    code, events = run_entry_point(
        [*arguments, "--image-root", str(shard.image_root)], tmp_path / "p.jsonl"
    )
    assert code == ExitCode.PRECONDITION
    assert events == [
        {
            **events[0],
            "event": "error",
            "error": "FailedPrecondition",
            "exit_code": int(ExitCode.PRECONDITION),
        }
    ]
    stderr = capsys.readouterr().err
    assert "training.device is 'cuda', but CUDA is not available" in stderr
    assert "Traceback" not in stderr
