"""One federation of the paper's settings, run through the real commands on loopback.

``coordinator init / recipe / partition / invite / serve``, ``site-agent join`` per expert (in
parallel, one torch thread each), ``coordinator assemble``, a reader's ``atoll download``,
``atoll verify``, ``atoll generate`` and ``atoll eval``: each a real subprocess, as a person
would type it (the README's "real federation" section shows the same lines). The data is the
demo's (``scripts/demo.py``), small: two visually distinct domains, shapes and charts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "scripts"))

from demo import Size, write_dataset  # type: ignore[import-not-found]  # noqa: E402

# Small enough to train in seconds per expert, large enough for K = 4 two-stage clustering.
DATA = Size(
    train_images=12, eval_images=3, text_samples=4, eval_text=2, epochs=1, learning_rate=3e-3
)


def tiny_recipe(out: Path, architecture: str, lora: bool = False) -> Path:
    """``configs/tiny-cpu.yaml`` for ``architecture`` (llava, internvl), one epoch, optionally
    with LoRA (rank 4) over the frozen base, written to ``out``."""
    recipe = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    recipe["name"] = f"tiny-{architecture}{'-lora' if lora else ''}"
    recipe["model"]["architecture"] = architecture
    if architecture == "internvl":
        # The paper's InternVL setting fine-tunes everything (ViT + MLP + LLM).
        recipe["model"]["freeze"] = {"vision_tower": False, "projector": False}
        recipe["model"]["freeze"]["language_model"] = False
    if architecture == "causal-lm":
        recipe["model"]["freeze"] = {"language_model": False}  # no tower, no projector
    if lora:
        recipe["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}
    recipe["training"].update(epochs=1, save_steps=1000, per_device_batch_size=8)
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def write_data(out: Path) -> Path:
    """The demo's data set, small: ``out/train.json``, ``out/eval.json``, ``out/images/``."""
    write_dataset(out, DATA)
    return out


def free_port() -> int:
    """A port p with p + 1 (enrolment) free too."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        try:
            with socket.socket() as other:
                other.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise AssertionError("no free pair of ports on loopback")


def _env(threads: int = 1) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


@dataclass
class Federation:
    """A coordinator state directory, its server and its sites, under ``root``."""

    root: Path
    name: str
    port: int = field(default_factory=free_port)
    server: subprocess.Popen[bytes] | None = None
    commands: list[str] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, program: str, *args: str, expect: int = 0, timeout: float = 300) -> str:
        """Runs a command; its stdout (asserting the exit code, showing stderr if not)."""
        self.commands.append(" ".join([program, *args]))
        done = subprocess.run(
            [str(BIN / program), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(2),
            cwd=self.root,
        )
        assert done.returncode == expect, (
            f"`{program} {' '.join(args)}` exited {done.returncode}, expected {expect}:\n"
            f"{done.stderr[-3000:]}"
        )
        return done.stdout if expect == 0 else done.stderr

    def coordinator(self, command: str, *args: str, expect: int = 0) -> str:
        return self.run("coordinator", command, "--state", str(self.state), *args, expect=expect)

    def set_up(self, recipe: Path, base_model: Path | None = None) -> None:
        """``init`` and ``recipe`` (the base is materialised here for init-from-config)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.coordinator("init", "--federation", self.name)
        extra = ["--base-model", str(base_model)] if base_model else []
        self.coordinator("recipe", "--recipe", str(recipe), *extra)

    def partition(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.coordinator("partition", "--device", "cpu", "--workers",
                                                "0", "--json", *args)))  # fmt: skip

    def train(self, experts: int, image_root: Path | None, timeout: float = 420) -> None:
        """``invite`` and ``serve``, then one ``site-agent join`` per expert until each has
        trained, signed and uploaded its expert (they exit when it is accepted)."""
        tokens = [self.coordinator("invite", f"site-{k}", "--ttl", "1h").strip() for k in range(experts)]  # fmt: skip
        log = (self.root / "serve.log").open("ab")
        self.server = subprocess.Popen(
            [str(BIN / "coordinator"), "serve", "--state", str(self.state), "--listen",
             self.address, "--heartbeat-seconds", "1"],
            stdout=log, stderr=log, env=_env(1),
        )  # fmt: skip
        joins = []
        for k, token in enumerate(tokens):
            args = ["join", "--coordinator", self.address, "--token", token]
            args += ["--workdir", str(self.root / f"site-{k}")]
            if image_root is not None:
                args += ["--image-root", str(image_root)]
            self.commands.append("site-agent " + " ".join(args))
            site_log = (self.root / f"site-{k}.log").open("ab")
            joins.append(
                subprocess.Popen(
                    [str(BIN / "site-agent"), *args], stdout=site_log, stderr=site_log, env=_env(1)
                )
            )
        deadline = time.monotonic() + timeout
        try:
            for k, join in enumerate(joins):
                code = join.wait(max(1.0, deadline - time.monotonic()))
                log_text = (self.root / f"site-{k}.log").read_text()[-3000:]
                assert code == 0, f"site-{k} exited {code}:\n{log_text}"
        finally:
            for join in joins:
                if join.poll() is None:
                    join.kill()
                    join.wait(10)

    def publish(self, *assemble_args: str) -> tuple[dict[str, Any], Path]:
        """``assemble``, a reader token, ``atoll download`` and ``atoll verify``: the assembly
        result and the downloaded ensemble."""
        result = json.loads(self.coordinator("assemble", "--json", *assemble_args))
        token = self.coordinator("invite", "--role", "reader", "reader", "--ttl", "1h").strip()
        out = self.root / "download"
        self.run("atoll", "download", "--coordinator", self.address, "--token", token,
                 "--out", str(out), "--workdir", str(self.root / "reader"))  # fmt: skip
        self.run("atoll", "verify", str(out), "--trust", str(self.state / "ca" / "ca.pem"))
        return result, out

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(15)


def generate(federation: Federation, ensemble: Path, *args: str) -> dict[str, Any]:
    """``atoll generate --json`` on the downloaded ensemble."""
    out = federation.run("atoll", "generate", "--ensemble", str(ensemble), "--device", "cpu",
                         "--max-new-tokens", "4", "--json", *args)  # fmt: skip
    return dict(json.loads(out))


def evaluate(federation: Federation, ensemble: Path, data: Path, *args: str) -> dict[str, Any]:
    """``atoll eval --json`` of the held-out questions."""
    out = federation.run("atoll", "eval", "--ensemble", str(ensemble), "--data", str(data / "eval.json"),
                         "--image-root", str(data / "images"), "--metric", "exact",
                         "--max-new-tokens", "4", "--device", "cpu", "--json", *args)  # fmt: skip
    return dict(json.loads(out))
