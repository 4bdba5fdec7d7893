"""One progress helper: rich bars on a terminal, a few log lines elsewhere, never a flood."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from protocol import progress as progress_module
from protocol.progress import progress_bars, quiet_library_bars
from site_agent.transfer import upload_directory


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "atoll.progress"]


@pytest.fixture
def not_a_terminal(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # rich's switch; wins over FORCE_COLOR
    caplog.set_level(logging.INFO, logger="atoll.progress")


def test_off_a_terminal_a_task_is_two_lines_however_often_it_advances(
    not_a_terminal: None, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with progress_bars() as bars:
        advance = bars.add("upload expert-0", 2_000_000, unit="bytes", completed=500_000)
        threads = [
            threading.Thread(target=lambda: [advance(100) for _ in range(3_750)]) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    lines = _lines(caplog)
    assert lines[0] == "upload expert-0: 500.0 kB of 2.0 MB (25%): started"
    assert len(lines) == 2 and lines[1].startswith("upload expert-0: 2.0 MB of 2.0 MB (100%) in ")
    err = capfd.readouterr().err  # may hold log lines, if an earlier test put a handler on root
    assert "\r" not in err and "\x1b[" not in err  # no bar drawn, no carriage returns


def test_off_a_terminal_a_long_task_says_where_it_is_now_and_then(
    not_a_terminal: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress_module, "LINE_EVERY", 0.0)
    with progress_bars() as bars:
        advance = bars.add("hashing images", 4)
        for _ in range(4):
            advance(1)
        count = bars.add("received", unit="bytes")
        count(1500)
    lines = _lines(caplog)
    assert "hashing images: 2 of 4 (50%)" in lines
    assert "received: 1.5 kB" in lines
    assert lines[-2].startswith("hashing images: 4 of 4 (100%) in ")


def test_off_a_terminal_a_task_cut_short_says_it_stopped(
    not_a_terminal: None, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConnectionError), progress_bars() as bars:
        bars.add("download base/model.safetensors", 10)(4)
        raise ConnectionError("dropped")
    assert _lines(caplog)[-1].startswith("download base/model.safetensors: 4 of 10 (40%) stopped")


def test_disabled_progress_says_nothing(
    not_a_terminal: None, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with progress_bars(enabled=False) as bars:
        bars.add("quiet", 10)(10)
    assert _lines(caplog) == [] and capfd.readouterr().err == ""


def test_on_a_terminal_it_draws_a_rich_bar_on_stderr(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    caplog.set_level(logging.INFO, logger="atoll.progress")
    with progress_bars() as bars:
        bars.add("fetching images", 3)(3)
    captured = capfd.readouterr()
    assert _lines(caplog) == [] and captured.out == ""
    assert "\x1b[" in captured.err  # terminal control codes: a live display


def test_library_bars_are_switched_off_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    try:
        quiet_library_bars()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert are_progress_bars_disabled()
    finally:
        enable_progress_bars()


def test_an_upload_off_a_terminal_logs_lines_not_a_bar(
    running: Any,
    tmp_path: Path,
    not_a_terminal: None,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    running.add_plan(1)
    workdir = running.enrol(tmp_path, "alpha")
    expert = tmp_path / "expert"
    expert.mkdir()
    (expert / "model.safetensors").write_bytes(os.urandom(3 << 20))  # three chunks
    with running.client(workdir) as client:
        client.get_assignment()
        upload_directory(client, 0, expert, progress=True)  # unsigned: sent, then refused
    lines = _lines(caplog)
    assert len(lines) == 2 and lines[0].startswith("upload expert-0: 0 bytes of 3.1 MB")
    assert "\r" not in capfd.readouterr().err
