"""What `serve` runs beside the gRPC ports for its operator: the Prometheus exporter and the
dashboard (each only when asked for), started before the server and stopped after it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.dashboard import start_dashboard
from coordinator.metrics import Metrics, start_exporter
from coordinator.state import StateDir
from coordinator.store import Store
from protocol.errors import InvalidArgument

log = logging.getLogger("atoll.coordinator")


@dataclass(frozen=True)
class OperationsOptions:
    metrics_listen: str | None = None
    dashboard_listen: str | None = None
    dashboard_token_file: Path | None = None


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise InvalidArgument(f"--dashboard-token-file {path}: unreadable ({error})") from error
    if len(token) < 16:
        raise InvalidArgument(
            f"--dashboard-token-file {path}: expected a token of at least 16 characters "
            f"(got {len(token)}); e.g. `openssl rand -hex 24 > {path}`"
        )
    return token


def start_operations(
    state: StateDir, store: Store, metrics: Metrics, options: OperationsOptions
) -> Callable[[], None]:
    """Starts what ``options`` asks for; returns the function that stops it all. A port in
    use fails here, before the federation's ports start answering."""
    stops: list[Callable[[], None]] = []
    try:
        if options.metrics_listen:
            exporter = start_exporter(metrics, options.metrics_listen)
            stops.append(exporter.stop)
            log.info("[Coordinator] metrics on %s (port %d)", options.metrics_listen, exporter.port)
        if options.dashboard_listen:
            token = (
                read_token(options.dashboard_token_file) if options.dashboard_token_file else None
            )
            dashboard = start_dashboard(state, store, options.dashboard_listen, token)
            stops.append(dashboard.stop)
            log.info("[Coordinator] dashboard at %s", dashboard.url)
            print(f"dashboard: {dashboard.url}", flush=True)
    except BaseException:
        for stop in reversed(stops):
            stop()
        raise

    def stop_all() -> None:
        for stop in reversed(stops):
            stop()

    return stop_all
