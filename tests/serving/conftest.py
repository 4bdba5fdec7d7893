"""Fixtures: the tiny K=2 ensemble of tests/ensemble_runtime (expert 0 owns the red squares,
expert 1 the blue circles), loaded once, and ``atoll serve`` processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ensemble_runtime.builders import build_ensemble
from ensemble_runtime.conftest import one_torch_thread

from ensemble.runtime import RoutedEnsemble

from .servers import Served, serve

__all__ = ["one_torch_thread"]  # the same one-thread rule for tiny models, package-wide


@pytest.fixture(scope="package")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ensemble(tmp_path_factory.mktemp("ensemble") / "ensemble")


@pytest.fixture(scope="package")
def ensemble(ensemble_dir: Path) -> RoutedEnsemble:
    return RoutedEnsemble.from_pretrained(ensemble_dir, verify=False, device="cpu")


@pytest.fixture(scope="package")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="package")
def served(
    ensemble_dir: Path, image_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """A real ``atoll serve`` process over the ensemble (max_tokens limit 64)."""
    logs = tmp_path_factory.mktemp("logs")
    with serve(
        ["--ensemble", str(ensemble_dir), "--image-root", str(image_root), "--max-tokens", "64"],
        logs / "serve.log",
    ) as server:
        yield server
