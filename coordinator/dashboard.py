"""A read-only live dashboard (`coordinator serve --dashboard-listen HOST:PORT`).

One server-rendered HTML page (no front-end build step) and a few lines of JS that re-fetch
its panel every two seconds: the federation and its plan, the balance table, each site's
phase, progress bar, ETA and loss curve (from the store's bounded heartbeat history), the
experts, uploads, the audit log's size and last signed checkpoint, certificate expiries and
revoked sites. ``/api/status`` serves the same data as JSON (``atoll.status/v1`` plus the
heartbeat histories).

It only reads. On a loopback address anyone on the machine may look; on any other address a
token is required (``Authorization: Bearer TOKEN`` or ``?token=TOKEN``), given to `serve` with
``--dashboard-token-file``, and the dashboard refuses to start without one.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from coordinator import status
from coordinator.state import StateDir
from coordinator.store import Store
from protocol.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("atoll.coordinator")
REFRESH_SECONDS = 2
# Points of a loss curve: the history is thinned to this many for the page.
CURVE_POINTS = 120


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (the last two on loopback)."""
    host, sep, port = listen.rpartition(":")
    if not port.isdigit():
        raise InvalidArgument(f"--dashboard-listen {listen!r}: expected HOST:PORT")
    return (host.strip("[]") if sep and host else "127.0.0.1"), int(port)


def snapshot(state: StateDir, store: Store) -> dict[str, Any]:
    """The status document plus each site's heartbeat history (what the page shows)."""
    document = status.status_document(state, store)
    document["history"] = {
        row["site"]: [
            {"at": h.at, "step": h.step, "total_steps": h.total_steps, "loss": h.loss}
            for h in store.heartbeat_history(row["site"])
            if h.total_steps
        ]
        for row in document["sites"]
    }
    plan = store.get_plan()
    summary = json.loads(plan.summary_json) if plan is not None else {}
    document["balance"] = summary.get("clusters", [])
    return document


# -- rendering ---------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value))


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds))


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds <= 0:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def loss_curve(points: list[dict[str, Any]], width: int = 160, height: int = 36) -> str:
    """An inline SVG polyline of loss against step (empty before two points)."""
    points = [p for p in points if p["loss"] == p["loss"]]  # drop NaN
    if len(points) < 2:
        return '<span class="muted">-</span>'
    stride = max(1, len(points) // CURVE_POINTS)
    points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    steps = [p["step"] for p in points]
    losses = [p["loss"] for p in points]
    x0, x1 = min(steps), max(steps) or 1
    y0, y1 = min(losses), max(losses)
    span_x, span_y = (x1 - x0) or 1, (y1 - y0) or 1
    coords = " ".join(
        f"{(s - x0) / span_x * (width - 2) + 1:.1f},{(1 - (v - y0) / span_y) * (height - 2) + 1:.1f}"
        for s, v in zip(steps, losses, strict=True)
    )
    label = f"loss {losses[0]:.3f} → {losses[-1]:.3f}"
    return (
        f'<svg class="curve" width="{width}" height="{height}" role="img" aria-label="{_e(label)}">'
        f'<title>{_e(label)}</title><polyline points="{coords}"/></svg>'
    )


def _progress(row: dict[str, Any]) -> str:
    total, step = row["total_steps"], row["step"]
    if not total:
        return '<span class="muted">-</span>'
    percent = 100.0 * step / total
    return (
        f'<div class="bar"><div style="width:{percent:.1f}%"></div></div>'
        f'<span class="step">{step}/{total} ({percent:.0f}%)</span>'
    )


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_panel(document: dict[str, Any]) -> str:
    """The page's live part (re-fetched by the page's script)."""
    plan = document["plan"]
    parts = [
        f'<p id="summary">plan {_e(plan["digest"][:12]) if plan else "none yet"}'
        f" · {plan['experts'] if plan else 0} experts"
        f" · {sum(1 for e in document['experts'] if e['phase'] == 'accepted')} accepted"
        f" · updated {_e(_when(document['generated_at']))}</p>"
    ]
    site_rows = []
    for row in document["sites"]:
        flags = " ".join(
            f'<span class="flag">{f}</span>'
            for f, on in (("REVOKED", row["revoked"]), ("SILENT", row["silent"]))
            if on
        )
        site_rows.append(
            [
                f'<span class="site">{_e(row["site"])}</span>',
                "-" if row["expert"] is None else _e(row["expert"]),
                f'<span class="phase phase-{_e(row["phase"])}">{_e(row["phase"])}</span> {flags}',
                _progress(row),
                f"{row['loss']:.4f}" if row["total_steps"] else "-",
                _e(_duration(row["eta_seconds"])),
                loss_curve(document["history"].get(row["site"], [])),
                _e(_duration(row["seconds_since_heartbeat"])) + " ago"
                if row["seconds_since_heartbeat"] is not None
                else "never",
                _e(_when(row["certificate_expires_at"])),
            ]
        )
    parts.append("<h2>Sites</h2>")
    parts.append(
        _table(
            [
                "site",
                "expert",
                "phase",
                "progress",
                "loss",
                "ETA",
                "loss curve",
                "heartbeat",
                "certificate expires",
            ],
            site_rows,
            "no site has enrolled yet",
        )
    )
    expert_rows = [
        [
            _e(e["index"]),
            _e(e["site"] or "-"),
            f'<span class="phase phase-{_e(e["phase"])}">{_e(e["phase"])}</span>',
            _e(e["accepted_upload_id"] or "-"),
            f"<code>{_e((e['accepted_model_digest'] or '-')[:16])}</code>",
            _e(e["accepted_at"] or "-"),
        ]
        for e in document["experts"]
    ]
    parts.append("<h2>Experts</h2>")
    parts.append(
        _table(
            ["expert", "site", "phase", "accepted upload", "model digest", "accepted at"],
            expert_rows,
            "no partition plan yet",
        )
    )
    balance_rows = [
        [
            _e(c.get(k, "-"))
            for k in ("expert", "unique_images", "samples", "image_samples", "text_only", "tokens")
        ]
        for c in document["balance"]
    ]
    parts.append("<h2>Balance</h2>")
    parts.append(
        _table(
            ["expert", "unique images", "samples", "image samples", "text-only", "tokens"],
            balance_rows,
            "no partition plan yet",
        )
    )
    upload_rows = []
    for u in document["uploads"]:
        share = u["received_bytes"] / u["total_bytes"] if u["total_bytes"] else 1.0
        upload_rows.append(
            [
                _e(u["upload_id"]),
                _e(u["site"]),
                _e(u["expert"]),
                _e(u["state"]),
                f'<div class="bar"><div style="width:{100 * share:.1f}%"></div></div>'
                f"{u['received_bytes']:,}/{u['total_bytes']:,} B",
                _e(u["reason"] or ""),
            ]
        )
    parts.append("<h2>Uploads</h2>")
    parts.append(
        _table(
            ["upload", "site", "expert", "state", "received", "reason"],
            upload_rows,
            "no uploads yet",
        )
    )
    audit, certs = document["audit"], document["certificates"]
    revoked = [row["site"] for row in document["sites"] if row["revoked"]]
    parts.append("<h2>Audit log and certificates</h2><ul>")
    parts.append(
        f'<li id="audit">{audit["events"]} events; last signed checkpoint: '
        + (
            f"size {audit['last_checkpoint_size']} at {_e(audit['last_checkpoint_at'])}"
            if audit["last_checkpoint_size"] is not None
            else "none yet"
        )
        + "</li>"
    )
    parts.append(
        f"<li>CA expires {_e(_when(certs['ca_expires_at']))}; serving certificate expires "
        f"{_e(_when(certs['server_expires_at']))}; site certificates live "
        f"{certs['lifetime_days']} days</li>"
    )
    parts.append(
        f'<li id="revoked">revoked sites: {_e(", ".join(revoked)) if revoked else "none"}</li></ul>'
    )
    return "\n".join(parts)


_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#fafbfc}
h1{font-size:20px;margin:0 0 .2em} h2{font-size:16px;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff} th,td{border:1px solid #d0d7de;padding:4px 8px;
text-align:left;vertical-align:middle} th{background:#f0f3f6} .muted{color:#6e7781}
.bar{display:inline-block;width:120px;height:10px;background:#eaeef2;border-radius:5px;
margin-right:6px;vertical-align:middle} .bar div{height:10px;background:#2da44e;border-radius:5px}
.curve polyline{fill:none;stroke:#0969da;stroke-width:1.5} .flag{color:#cf222e;font-weight:600}
.phase-done,.phase-accepted{color:#1a7f37;font-weight:600} .phase-failed{color:#cf222e}
code{font-size:12px}
"""

_SCRIPT = """
const query = window.location.search;
async function refresh() {
  try {
    const reply = await fetch('panel' + query, {cache: 'no-store'});
    if (reply.ok) {
      document.getElementById('panel').innerHTML = await reply.text();
      document.getElementById('live').textContent = 'live';
    } else {
      document.getElementById('live').textContent = 'refresh failed: HTTP ' + reply.status;
    }
  } catch (error) {
    document.getElementById('live').textContent = 'coordinator unreachable';
  }
}
setInterval(refresh, %d);
"""


def render_page(document: dict[str, Any]) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>Atoll · {_e(document['federation'])}</title><style>{_STYLE}</style></head>"
        f"<body><h1>Federation {_e(document['federation'])}</h1>"
        '<p class="muted">read-only dashboard · <span id="live">live</span></p>'
        f'<div id="panel">{render_panel(document)}</div>'
        f"<script>{_SCRIPT % (REFRESH_SECONDS * 1000)}</script></body></html>"
    )


# -- serving -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dashboard:
    url: str
    port: int
    stop: Callable[[], None]


def start_dashboard(
    state: StateDir, store: Store, listen: str, token: str | None = None
) -> Dashboard:
    """Serves the dashboard on ``listen``; a non-loopback address requires ``token``."""
    host, port = parse_listen(listen)
    if not is_loopback(host) and not token:
        raise FailedPrecondition(
            f"--dashboard-listen {listen}: a non-loopback address needs a token "
            "(--dashboard-token-file FILE); anyone who can reach it could read the federation"
        )

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug("[Dashboard] " + format, *args)

        def _allowed(self, query: dict[str, list[str]]) -> bool:
            if token is None:
                return True
            header = self.headers.get("Authorization", "")
            given = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
            given = given or (query.get("token") or [""])[0]
            return hmac.compare_digest(given.encode(), token.encode())

        def _send(self, code: int, body: str, kind: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self' 'unsafe-inline'")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if not self._allowed(query):
                self._send(
                    401, "a dashboard token is required (?token=... or Bearer)\n", "text/plain"
                )
                return
            routes = {"/": "page", "/panel": "panel", "/api/status": "json"}
            what = routes.get(url.path)
            if what is None:
                self._send(404, f"no page {url.path}\n", "text/plain")
                return
            document = snapshot(state, store)
            if what == "json":
                self._send(200, json.dumps(document, indent=2), "application/json")
            elif what == "panel":
                self._send(200, render_panel(document), "text/html")
            else:
                self._send(200, render_page(document), "text/html")

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as error:
        raise FailedPrecondition(f"--dashboard-listen {listen}: cannot listen ({error})") from error
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/"

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return Dashboard(url, server.server_port, stop)
