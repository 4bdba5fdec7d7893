"""Fixtures: one tiny ensemble directory per test session (built once, read-only), a fresh
copy for tests that damage it, and the loaded ensemble."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ensemble.runtime import RoutedEnsemble

from .builders import build_ensemble


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two contended ones (the CI machine is
    shared); restored afterwards for the rest of the suite."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """K=2 tiny LLaVA experts; expert 0 owns the red squares, expert 1 the blue circles."""
    return build_ensemble(tmp_path_factory.mktemp("ensemble") / "ensemble")


@pytest.fixture(scope="package")
def ensemble(ensemble_dir: Path) -> RoutedEnsemble:
    return RoutedEnsemble.from_pretrained(ensemble_dir, verify=True, device="cpu")


@pytest.fixture
def damaged(ensemble_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the ensemble directory to break."""
    return Path(shutil.copytree(ensemble_dir, tmp_path / "copy"))
