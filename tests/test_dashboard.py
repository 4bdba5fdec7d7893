"""The live dashboard in a real headless Chromium: a loopback federation of two sites, the page
shows both, and it updates in place (no reload) as heartbeats arrive. Saves a screenshot
(``$ATOLL_SCREENSHOT_DIR`` keeps a copy, e.g. to look at it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from chromium import Chromium, find_browser
from conftest import Running

from coordinator.dashboard import start_dashboard
from protocol.messages import Heartbeat


@pytest.mark.skipif(
    find_browser() is None,
    reason="no Chromium (Debian's chromium package; .ci/run installs it)",
)
@pytest.mark.slow
def test_dashboard_shows_both_sites_and_follows_heartbeats(
    running: Running, tmp_path: Path
) -> None:
    running.add_plan(2)
    clients = {}
    for name in ("alpha", "beta"):
        client = running.client(running.enrol(tmp_path, name))
        client.get_assignment()
        clients[name] = client
    for step, loss in ((10, 4.0), (20, 3.1), (30, 2.6), (40, 2.2)):
        clients["alpha"].heartbeat(
            Heartbeat(phase="training", step=step, total_steps=100, loss=loss, eta_seconds=900)
        )
    clients["beta"].heartbeat(Heartbeat(phase="downloading", message="2 artifact(s)"))
    dashboard = start_dashboard(running.state, running.coordinator.store, "127.0.0.1:0")
    try:
        with Chromium(tmp_path / "profile") as browser:
            browser.navigate(dashboard.url)
            text = browser.wait_for(
                "document.body && document.body.innerText.includes('beta') && "
                "document.body.innerText"
            )
            assert "Federation testfed" in text
            assert "alpha" in text and "beta" in text
            assert "40/100 (40%)" in text and "downloading" in text
            assert browser.evaluate("document.querySelectorAll('svg.curve polyline').length") == 1
            browser.evaluate("window.loadedOnce = true")  # gone if the page reloads

            for step, loss in ((60, 1.8), (80, 1.5)):
                clients["alpha"].heartbeat(
                    Heartbeat(phase="training", step=step, total_steps=100, loss=loss)
                )
            clients["beta"].heartbeat(Heartbeat(phase="training", step=5, total_steps=50, loss=5))
            text = browser.wait_for(
                "document.body.innerText.includes('80/100') && document.body.innerText"
            )
            assert "5/50 (10%)" in text  # beta moved on too
            assert browser.evaluate("window.loadedOnce") is True  # updated in place
            # A point per heartbeat: the curve grew from 4 to 6 points.
            points = browser.evaluate(
                "document.querySelector('svg.curve polyline').getAttribute('points')"
            )
            assert len(points.split()) == 6
            shot = browser.screenshot(tmp_path / "dashboard.png")
        assert shot.stat().st_size > 10_000
        keep = os.environ.get("ATOLL_SCREENSHOT_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / "dashboard.png")
    finally:
        dashboard.stop()
        for client in clients.values():
            client.close()
