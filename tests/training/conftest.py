"""Fixtures for the training core tests (helpers live in ``synthetic``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .synthetic import Shard, write_recipe, write_shard


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models train several times faster on one thread than on two contended ones (the CI
    machine is shared); restored afterwards for the rest of the suite."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def shard(tmp_path: Path) -> Shard:
    """A small image+text shard in a temporary directory."""
    return write_shard(tmp_path / "shard")


@pytest.fixture
def recipe_factory(tmp_path: Path) -> Callable[..., Path]:
    """Writes a tiny recipe with overrides: ``recipe_factory(name, {"training": {...}})``."""

    def make(name: str = "recipe", overrides: dict[str, Any] | None = None) -> Path:
        return write_recipe(tmp_path / f"{name}.yaml", overrides)

    return make
