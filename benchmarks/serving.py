"""``atoll serve`` under concurrent clients vs. the same prompts run offline.

Builds a K-expert ensemble of tiny LLaVA experts (the test suite's builder,
``tests/ensemble_runtime/builders.py``; the routing benchmark's ``small`` model by default,
``--size tiny`` for ``configs/tiny-cpu.yaml``'s), then times the same ``--requests`` prompts (pictures of random kinds, greedy,
``--new-tokens`` each) two ways:

* offline (the anchor): one ``RoutedEnsemble.generate(images, prompts, batch_size=B)``;
* served: a real ``atoll serve`` process on loopback (``--max-batch 32 --batch-size B``,
  continuous batching) answering ``--clients`` concurrent clients (default 1, 8 and 32),
  each sending its share of the prompts one after another as OpenAI chat requests with the
  image as a data URL.

Prints requests/s, p50 and p99 latency per client count and the ratio served/offline
requests/s (target at 32 clients: >= 0.8). The server process and the client share the
machine; ``--threads`` sets torch's threads in both the anchor and the server.

Where the served time goes, per request (Linux ``/proc/PID/task/*/schedstat``): the server's
CPU time on its event loop (HTTP, JSON, base64 and PNG decoding, responses), on its engine
thread (encoding, routing, prefill, decoding) and on other threads, the time the engine
waited for a CPU (other processes, the client and the event loop taking the cores), and
the client's own CPU time; beside them the anchor's CPU time per request. The load average
at the end of the run says how busy the machine was.

    .venv/bin/python benchmarks/serving.py [--size small|tiny] [--requests 64] [--new-tokens 16]
        [--clients 1 8 32] [--batch 32] [--threads 1] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import torch  # noqa: E402
from ensemble_runtime.builders import (  # type: ignore[import-not-found]  # noqa: E402
    KINDS,
    build_ensemble,
    picture,
)
from routing import SIZES  # type: ignore[import-not-found]  # noqa: E402

from ensemble.runtime import RoutedEnsemble  # noqa: E402

PROMPT = "Describe the picture in detail."


def _data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_server(directory: Path, args: argparse.Namespace, log: Path) -> tuple[Any, str]:
    port = _free_port()
    threads = str(args.threads)
    env = os.environ | {"OMP_NUM_THREADS": threads, "ATOLL_TORCH_THREADS": threads}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", _SERVER, str(directory), f"127.0.0.1:{port}"]
    command += [str(args.batch), args.device, threads]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"atoll serve exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"atoll serve did not start: {log.read_text()}")


# `atoll serve` itself, with torch's thread count set first (the CLI leaves it to torch).
_SERVER = """
import sys, torch
directory, listen, batch, device, threads = sys.argv[1:]
torch.set_num_threads(int(threads))
from ensemble.cli import main
sys.exit(main(["serve", "--ensemble", directory, "--listen", listen, "--max-batch", "32",
               "--batch-size", batch, "--device", device, "--max-tokens", "512",
               "--max-queue", "256", "--batch-window-ms", "5"]))
"""


def _thread_times(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of ``pid``: (seconds on a CPU, seconds waiting for one)."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run, wait, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue  # the thread ended
        times[int(task.name)] = (int(run) / 1e9, int(wait) / 1e9)
    return times


def _where_time_went(
    pid: int, before: dict[int, tuple[float, float]], requests: int
) -> dict[str, float]:
    """The server's CPU ms per request: event loop (the main thread), engine (the busiest
    other thread), other threads; and ms the engine waited for a CPU."""
    after = _thread_times(pid)
    spent = {
        tid: (run - before.get(tid, (0.0, 0.0))[0], wait - before.get(tid, (0.0, 0.0))[1])
        for tid, (run, wait) in after.items()
    }
    loop = spent.pop(pid, (0.0, 0.0))
    engine_tid = max(spent, key=lambda tid: spent[tid][0])
    engine = spent.pop(engine_tid)
    per = 1000 / requests
    return {
        "loop_ms": loop[0] * per,
        "engine_ms": engine[0] * per,
        "other_ms": sum(run for run, _ in spent.values()) * per,
        "engine_wait_ms": engine[1] * per,
    }


async def _clients(url: str, bodies: list[dict[str, Any]], clients: int) -> dict[str, float]:
    latencies: list[float] = []
    queue = list(range(len(bodies)))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            body = bodies[queue.pop()]
            start = time.perf_counter()
            reply = await http.post(f"{url}/v1/chat/completions", json=body)
            reply.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "requests_per_s": len(bodies) / elapsed,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch", type=int, default=32, help="rows per model call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    kinds = [rng.choice(sorted(KINDS)) for _ in range(args.requests)]
    images = [picture(kind, rng.randrange(4)) for kind in kinds]
    bodies = [
        {
            "model": "atoll",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _data_url(image)}},
                        {"type": "text", "text": PROMPT},
                    ],
                }
            ],
            "max_tokens": args.new_tokens,
            "temperature": 0,
        }
        for image in images
    ]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        seeds = tuple(range(11, 11 + args.experts))
        directory = build_ensemble(
            work / "ensemble", seeds=seeds, size=SIZES[args.size], scratch=work / "pictures"
        )
        ensemble = RoutedEnsemble.from_pretrained(directory, device=args.device)
        prompts = [PROMPT] * args.requests

        cpu_s: list[float] = []

        def offline() -> float:
            start, cpu = time.perf_counter(), time.thread_time()
            ensemble.generate(images, prompts, args.new_tokens, batch_size=args.batch)
            cpu_s.append(time.thread_time() - cpu)
            return time.perf_counter() - start

        offline()  # warm-up
        before = args.requests / min(offline() for _ in range(2))
        process, url = _start_server(directory, args, work / "serve.log")
        served_rows = []
        try:
            asyncio.run(_clients(url, bodies[: min(8, len(bodies))], 4))  # warm-up
            for clients in args.clients:
                times, client_cpu = _thread_times(process.pid), time.process_time()
                row = {"clients": clients, **asyncio.run(_clients(url, bodies, clients))}
                row["client_ms"] = 1000 * (time.process_time() - client_cpu) / len(bodies)
                served_rows.append(row | _where_time_went(process.pid, times, len(bodies)))
        finally:
            process.terminate()
            process.wait(timeout=30)
        # Measured again once the server is gone; the faster of the two is the anchor, so
        # that drift in a shared machine's load does not flatter the server.
        after = args.requests / min(offline() for _ in range(2))
        offline_rate = max(before, after)
        rows = [row | {"ratio": row["requests_per_s"] / offline_rate} for row in served_rows]
    report = {
        "size": args.size,
        "device": args.device,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "offline_requests_per_s": offline_rate,
        "offline_before_after": [before, after],
        "offline_cpu_ms": 1000 * min(cpu_s) / args.requests,
        "served": rows,
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{args.size} ensemble, {args.requests} requests x {args.new_tokens} tokens, "
        f"batch {args.batch}, {args.device}; offline generate: {offline_rate:.1f} req/s "
        f"(before {before:.1f}, after {after:.1f})"
    )
    print(
        f"{'clients':>8} {'req/s':>8} {'p50 s':>8} {'p99 s':>8} {'served/offline':>15}   "
        "CPU ms/request: server loop, engine, other; engine waiting for a CPU; client"
    )
    for row in rows:
        print(
            f"{row['clients']:>8} {row['requests_per_s']:>8.1f} {row['p50_s']:>8.3f} "
            f"{row['p99_s']:>8.3f} {row['ratio']:>15.2f}   {row['loop_ms']:.2f}, "
            f"{row['engine_ms']:.2f}, {row['other_ms']:.2f}; {row['engine_wait_ms']:.2f}; "
            f"{row['client_ms']:.2f}"
        )
    print(
        f"offline CPU ms/request: {report['offline_cpu_ms']:.2f}; load average "
        + ", ".join(f"{x:.2f}" for x in report["load_average"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
