"""Work done once per site, not once per rank: two real gloo ranks (torch.multiprocessing),
rank 0 does the work, both get its result, or both its domain error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from protocol.errors import VerificationFailed
from site_agent.training import parallelize

pytestmark = pytest.mark.slow


def _rank(rank: int, store: str, log: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for fail in (False, True):

            def work(fail: bool = fail) -> int:
                with open(log, "a") as handle:
                    handle.write(f"work on rank {rank}, fail={fail}\n")
                if fail:
                    raise VerificationFailed("img-000.png: expected sha256 00.., got ab..")
                return 24

            try:
                outcome = f"result {parallelize.on_main_process(work)}"
            except VerificationFailed as error:
                outcome = f"{type(error).__name__}: {error}"
            with open(log, "a") as handle:
                handle.write(f"rank {rank}, fail={fail}: {outcome}\n")
        facts = parallelize.launch_facts("cpu")
        with open(log, "a") as handle:
            handle.write(f"rank {rank}: {facts}\n")
    finally:
        dist.destroy_process_group()


def test_rank_0_works_and_every_rank_gets_its_result_or_its_error(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(log)), nprocs=2)
    error = "VerificationFailed: img-000.png: expected sha256 00.., got ab.."
    facts = {"processes": 2, "nodes": 1, "devices": ["cpu", "cpu"], "gpus": []}
    assert sorted(log.read_text().splitlines()) == [
        "rank 0, fail=False: result 24",
        f"rank 0, fail=True: {error}",
        f"rank 0: {facts}",
        "rank 1, fail=False: result 24",
        f"rank 1, fail=True: {error}",
        f"rank 1: {facts}",
        "work on rank 0, fail=False",
        "work on rank 0, fail=True",
    ]
