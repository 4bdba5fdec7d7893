"""Balanced spherical k-means against its anchors, side by side in one run.

Synthetic clustered unit vectors (D = 512 by default), K in {2, 16, 128}, 20 Lloyd iterations:

* ``faiss``: unbalanced spherical k-means (faiss's own practice: fit on 256 points per
  centroid, then assign every point to its nearest centroid) -- the floor;
* ``ours``: what ``coordinator partition`` does -- balanced k-means fitted on the same
  subsample, then an exactly balanced assignment of every point;
* with ``--full``: both on every point in every iteration;
* ``balanced-kmeans`` (PyPI; the package the paper's authors and c-BTM use) at ``--bk-n``
  points (default 100,000: a few minutes in all), or the largest halving of it that fits in
  free memory (it builds N x K x D tensors) and runs in time, next to ours at the same size
  (skipped with a message if it is not installed);
* quality: our balanced assignment's total cosine against the exact optimum
  (``scipy.optimize.linear_sum_assignment`` on the replicated cost matrix) at N = 2,000.

Each timed run is its own process, so its peak memory (ru_maxrss) is its own; memory is
reported as peak / feature-matrix bytes. Each method first runs once untimed on a small problem
(loading numba's compiled code, starting thread pools). Not part of the test suite::

    .venv/bin/python benchmarks/partition.py                 # N = 1,000,000
    .venv/bin/python benchmarks/partition.py --n 200000 --full
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_data(path: Path, n: int, dim: int, seed: int) -> None:
    """Clustered unit vectors: 1,000 Gaussian blobs of uneven sizes, written as .npy."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    weights = rng.pareto(1.5, 1000) + 1
    weights /= weights.sum()
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 100_000):
        size = min(100_000, n - start)
        block = centres[rng.choice(1000, size, p=weights)]
        block += rng.standard_normal((size, dim), dtype=np.float32)
        out[start : start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()


def _proc_bytes(path: str, field: str) -> int:
    """A ``kB`` field of a /proc file (``VmRSS`` of /proc/self/status, ``MemAvailable`` of
    /proc/meminfo), in bytes."""
    with open(path) as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def warm_up(method: str, k: int, dim: int) -> None:
    """One small untimed run of the same code, so that no timed run pays for loading compiled
    code or first-call set-up (numba's cached machine code, faiss's and torch's thread pools)."""
    rng = np.random.default_rng(1)
    n = max(4 * k, 8192) // k * k  # above _NEWTON_MIN_POINTS: Newton (and its solver) runs too
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if method.startswith("faiss"):
        import faiss

        faiss.Kmeans(dim, k, niter=2, spherical=True, seed=0, verbose=False).train(x)
    elif method.startswith("ours"):
        from coordinator.partition import kmeans

        result = kmeans.balanced_spherical_kmeans(x, k, seed=0, max_iter=2)
        kmeans.balanced_assignment(x @ result.centroids.T, prices=result.prices)
    else:
        import torch
        from balanced_kmeans import kmeans_equal

        twice = torch.from_numpy(np.stack([x, x]))
        start = torch.from_numpy(x[:k])
        kmeans_equal(
            twice,
            num_clusters=k,
            cluster_size=n // k,
            max_iters=2,
            initial_state=torch.stack([start, start]),
        )


def worker(method: str, data: Path, k: int, iters: int, n: int | None) -> dict[str, Any]:
    """One timed run in this process; returns seconds, sizes and peak memory."""
    import faiss

    from coordinator.partition import kmeans

    before = _proc_bytes("/proc/self/status", "VmRSS")
    x = np.load(data)
    if n is not None:
        x = np.ascontiguousarray(x[:n])
    rng = np.random.default_rng(0)
    fit_rows = np.sort(rng.choice(x.shape[0], min(x.shape[0], 256 * k), replace=False))
    warm_up(method, k, x.shape[1])
    start = time.perf_counter()
    if method.startswith("faiss"):
        full = method == "faiss-full"
        model = faiss.Kmeans(
            x.shape[1],
            k,
            niter=iters,
            spherical=True,
            seed=0,
            max_points_per_centroid=x.shape[0] if full else 256,
            verbose=False,
        )
        model.train(x)
        labels = model.index.search(x, 1)[1][:, 0]
    elif method in ("ours", "ours-full"):
        fit = x if method == "ours-full" else x[fit_rows]
        result = kmeans.balanced_spherical_kmeans(fit, k, seed=0, max_iter=iters, tol=-1.0)
        labels = result.labels
        if method == "ours":
            import torch

            # torch's matmul, as the library uses: numpy's OpenBLAS threads fight torch's.
            similarity = (torch.from_numpy(x) @ torch.from_numpy(result.centroids).T).numpy()
            labels, _ = kmeans.balanced_assignment(similarity, prices=result.prices)
    elif method == "balanced-kmeans":
        import torch
        from balanced_kmeans import kmeans_equal

        # Its API is batched (B x N x D) but squeezes away a batch of one, and its own
        # initialisation fails on a batch: so it gets the same problem twice (the time is
        # halved below) and K random points (faiss's and our initialisation too). K must
        # divide N.
        x = np.ascontiguousarray(x[: x.shape[0] // k * k])
        twice = torch.from_numpy(np.stack([x, x]))
        start_centres = torch.from_numpy(x[rng.choice(x.shape[0], k, replace=False)])
        start = time.perf_counter()
        ids, _ = kmeans_equal(
            twice,
            num_clusters=k,
            cluster_size=x.shape[0] // k,
            max_iters=iters,
            initial_state=torch.stack([start_centres, start_centres]),
        )
        start += (time.perf_counter() - start) / 2  # count one of the two identical problems
        # Its labels are choices[:, :, 0] (each row filled with its cluster id), read here
        # correctly: the uneven sizes are its own. Cluster j takes the cluster_size rows that
        # rank j highest, and rows taken by an earlier cluster (rows now all equal to that id)
        # rank every later cluster first, so later clusters steal them.
        labels = ids[0].numpy()
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - start
    sizes = np.bincount(labels, minlength=k)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "memory_ratio": (peak - before) / x.nbytes,
    }


def run_worker(
    method: str, data: Path, k: int, iters: int, n: int | None, timeout: float
) -> dict[str, Any] | None:
    command = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--data",
        str(data),
        "--k",
        str(k),
        "--iters",
        str(iters),
    ]
    if n is not None:
        command += ["--worker-n", str(n)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        print(f"  {method} K={k}: gave up after {timeout:.0f} s")
        return None
    except subprocess.CalledProcessError as error:
        why = error.stderr.strip().splitlines()[-1:] or [f"exit status {error.returncode}"]
        print(f"  {method} K={k} N={n}: failed: {why[0]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bk_bytes(n: int, k: int, dim: int) -> int:
    """balanced-kmeans' peak memory: it materialises ``(x - c) ** 2`` as N x K x D float32
    tensors; its peak resident set was 4.2x one of them (measured at N = 20,000, K = 128)."""
    return int(4.5 * n * k * dim * 4)


def quality(ks: list[int], n: int, dim: int) -> None:
    from scipy.optimize import linear_sum_assignment

    from coordinator.partition import kmeans

    print(f"\nassignment quality at N = {n} (ours / exact LAP optimum on replicated costs)")
    rng = np.random.default_rng(1)
    for k in ks:
        x = rng.standard_normal((n, dim)).astype(np.float32)
        centres = rng.standard_normal((min(k, 8), dim)).astype(np.float32)
        x += 2 * centres[rng.integers(0, len(centres), n)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        c = x[rng.choice(n, k, replace=False)]
        similarity = np.ascontiguousarray(x @ c.T)
        labels, _ = kmeans.balanced_assignment(similarity)
        ours = float(similarity[np.arange(n), labels].sum(dtype=np.float64))
        columns = np.repeat(np.arange(k), kmeans.balanced_sizes(n, k))
        rows, cols = linear_sum_assignment(-similarity[:, columns].astype(np.float64))
        best = float(similarity[rows, columns[cols]].sum(dtype=np.float64))
        sizes = np.bincount(labels, minlength=k)
        print(f"  K={k:4d}: ratio {ours / best:.6f}  (sizes {sizes.min()}..{sizes.max()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 16, 128])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--full", action="store_true", help="also fit on every point")
    parser.add_argument(
        "--bk-n", type=int, default=100_000, help="largest N tried for balanced-kmeans"
    )
    parser.add_argument("--quality-n", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.k[0], args.iters, args.worker_n)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "x.npy"
        print(f"generating {args.n} x {args.dim} clustered unit vectors ...")
        make_data(data, args.n, args.dim, seed=0)
        print(f"\nN = {args.n}, D = {args.dim}, {args.iters} iterations; ratio = ours / anchor")
        for k in args.k:
            balanced = args.n // k
            floor = run_worker("faiss", data, k, args.iters, None, args.timeout)
            ours = run_worker("ours", data, k, args.iters, None, args.timeout)
            if floor and ours:
                print(
                    f"K={k:4d} fit on 256/centroid: faiss {floor['seconds']:7.1f} s "
                    f"(sizes {floor['min_size']}..{floor['max_size']}, balanced {balanced}) | "
                    f"ours {ours['seconds']:7.1f} s (sizes {ours['min_size']}..{ours['max_size']}) "
                    f"| time ratio {ours['seconds'] / floor['seconds']:.2f} (target <= 1.5) "
                    f"| peak memory {ours['memory_ratio']:.2f}x features (target < 2)"
                )
            if args.full:
                floor = run_worker("faiss-full", data, k, args.iters, None, args.timeout)
                ours = run_worker("ours-full", data, k, args.iters, None, args.timeout)
                if floor and ours:
                    print(
                        f"K={k:4d} every point:        faiss {floor['seconds']:7.1f} s | "
                        f"ours {ours['seconds']:7.1f} s (sizes {ours['min_size']}..{ours['max_size']}) "
                        f"| time ratio {ours['seconds'] / floor['seconds']:.2f} "
                        f"| peak memory {ours['memory_ratio']:.2f}x features"
                    )
        try:
            import balanced_kmeans  # noqa: F401
        except ImportError:
            print("\nbalanced-kmeans is not installed (pip install balanced-kmeans): skipped")
        else:
            print(
                f"\nbalanced-kmeans (PyPI) at N up to {args.bk_n}, every point, "
                f"{args.iters} iterations"
            )
            for k in args.k:
                # At the largest N (halving from --bk-n) that it handles in memory and time.
                size = args.bk_n
                while size // 2 >= 8 * k and _bk_bytes(size, k, args.dim) > _proc_bytes(
                    "/proc/meminfo", "MemAvailable"
                ):
                    print(
                        f"  balanced-kmeans K={k} N={size}: needs about "
                        f"{_bk_bytes(size, k, args.dim) / 2**30:.0f} GiB, more than is free"
                    )
                    size //= 2
                theirs = run_worker("balanced-kmeans", data, k, args.iters, size, args.timeout)
                while theirs is None and size // 2 >= 8 * k:
                    size //= 2
                    theirs = run_worker("balanced-kmeans", data, k, args.iters, size, args.timeout)
                ours = run_worker("ours-full", data, k, args.iters, size, args.timeout)
                if theirs and ours:
                    print(
                        f"K={k:4d} N={size}: balanced-kmeans {theirs['seconds']:7.1f} s "
                        f"(sizes {theirs['min_size']}..{theirs['max_size']}) | ours "
                        f"{ours['seconds']:7.1f} s | speed-up {theirs['seconds'] / ours['seconds']:.1f}x "
                        "(target >= 10)"
                    )
        quality(args.k, args.quality_n, args.dim)


if __name__ == "__main__":
    main()
