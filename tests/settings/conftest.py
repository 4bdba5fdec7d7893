"""The demo's data set, small, written once for every setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import write_data


@pytest.fixture(scope="package")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))
