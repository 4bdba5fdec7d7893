"""``atoll serve`` as a real process on a free loopback port, and images as data URLs."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image


@dataclass(frozen=True)
class Served:
    base_url: str  # http://127.0.0.1:PORT/v1
    log: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serve(args: list[str], log: Path) -> Iterator[Served]:
    """Runs ``atoll serve ARGS --listen 127.0.0.1:PORT`` until the block ends."""
    with serve_all([(args, log)]) as (served,):
        yield served


@contextlib.contextmanager
def serve_all(
    specs: list[tuple[list[str], Path]], startup_s: float = 240.0, ports: list[int] | None = None
) -> Iterator[list[Served]]:
    """Starts one ``atoll serve`` per ``(args, log)`` at once (on ``ports``, default free
    ones) and waits until every one answers ``/health``."""
    ports = ports or [free_port() for _ in specs]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    processes = []
    try:
        for (args, log), port in zip(specs, ports, strict=True):
            listen = ["--listen", f"127.0.0.1:{port}"]
            command = [sys.executable, "-m", "ensemble.cli", "serve", *args, *listen]
            with log.open("wb") as output:
                processes.append(
                    subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
                )
        deadline = time.monotonic() + startup_s
        for process, (_, log), port in zip(processes, specs, ports, strict=True):
            while not _healthy(port):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"atoll serve exited {process.returncode}: {log.read_text()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"atoll serve did not start: {log.read_text()}")
                time.sleep(0.3)
        yield [
            Served(f"http://127.0.0.1:{port}/v1", log)
            for (_, log), port in zip(specs, ports, strict=True)
        ]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, image: Image.Image | None = None) -> list[dict[str, object]]:
    """One user message: the image (as a data URL) and the text."""
    if image is None:
        return [{"role": "user", "content": text}]
    parts: list[dict[str, object]] = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": text},
    ]
    return [{"role": "user", "content": parts}]
