"""Many sites against one coordinator: heartbeats at a realistic pace and flat out.

A real `coordinator serve` process; N sites, each enrolled with its own key and certificate
(the enrolment functions, in-process, to set up quickly) and its own mutual-TLS connection,
simulated by asyncio tasks in this process. Every figure is a ratio against the anchor run
side by side: one site calling flat out against the same server.

* paced: every site sends one Heartbeat per ``--interval`` seconds (10 s is what `coordinator
  serve` asks for), starting at a random moment; target at 1,000 sites: p99 < 100 ms, 0 errors.
* flat out: every site calls again as soon as its answer arrives.

Prints req/s, p50/p99 latency, errors by status, and the coordinator's peak RSS.

    .venv/bin/python benchmarks/load.py [--sites 100,1000] [--interval 10] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from rich.progress import track

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loopback import free_port, peak_rss_mb  # noqa: E402
from coordinator import enrolment  # noqa: E402
from coordinator.federation import init_federation, load_authority  # noqa: E402
from coordinator.state import StateDir  # noqa: E402
from protocol import federation_pb2 as pb  # noqa: E402
from protocol import federation_pb2_grpc as pb_grpc  # noqa: E402
from protocol.identity import coordinator_dns_name  # noqa: E402
from protocol.x509 import new_p256_key, private_key_pem  # noqa: E402

FEDERATION = "loadtest"


@dataclass(frozen=True)
class Site:
    key_pem: bytes
    cert_pem: bytes


@dataclass
class Result:
    scenario: str
    sites: int
    seconds: float
    calls: int
    errors: dict[str, int]
    req_per_s: float
    p50_ms: float
    p99_ms: float
    coordinator_peak_rss_mb: float  # since the server started (scenarios run in order)


def enrol_sites(state: StateDir, count: int) -> list[Site]:
    """``count`` sites through the real invite + enroll path (CSR, CA signature, store)."""
    store = state.open_store()
    ca = load_authority(state)
    sites = []
    try:
        for i in track(range(count), description=f"enrolling {count} sites"):
            token = enrolment.invite(store, ca, f"site-{i:05d}", 3600)
            key = new_p256_key()
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, token.site)])
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(name)
                .sign(key, hashes.SHA256())
            )
            result = enrolment.enroll(
                store,
                ca,
                token.credential,
                token.site,
                csr.public_bytes(serialization.Encoding.PEM),
            )
            sites.append(Site(private_key_pem(key), result.certificate_pem))
    finally:
        store.close()
    return sites


class Fleet:
    """One channel (one TLS connection, one certificate) per site."""

    def __init__(self, address: str, ca_pem: bytes, sites: list[Site]) -> None:
        options = [("grpc.ssl_target_name_override", coordinator_dns_name(FEDERATION))]
        self.stubs = []
        self.channels = []
        for site in sites:
            credentials = grpc.ssl_channel_credentials(ca_pem, site.key_pem, site.cert_pem)
            channel = grpc.aio.secure_channel(address, credentials, options=options)
            self.channels.append(channel)
            self.stubs.append(pb_grpc.FederationStub(channel))

    async def connect(self) -> None:
        """One call per site, 50 at a time, so TLS handshakes are not part of any figure."""
        gate = asyncio.Semaphore(50)

        async def first(stub: pb_grpc.FederationStub) -> None:
            async with gate:
                await stub.Heartbeat(pb.HeartbeatRequest(phase="waiting"), timeout=120)

        await asyncio.gather(*(first(s) for s in self.stubs))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


async def drive(stubs: list[pb_grpc.FederationStub], seconds: float, interval: float | None):
    """Each stub calls Heartbeat until ``seconds`` pass: every ``interval`` seconds (random
    phase), or back to back when ``interval`` is None. Returns latencies and error codes."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    end = time.monotonic() + seconds
    request = pb.HeartbeatRequest(phase="training", step=1, total_steps=10, loss=1.5)

    async def site(stub: pb_grpc.FederationStub) -> None:
        if interval is not None:
            await asyncio.sleep(random.uniform(0, interval))
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                await stub.Heartbeat(request, timeout=30)
                latencies.append(time.monotonic() - started)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
            if interval is not None:
                await asyncio.sleep(max(0.0, started + interval - time.monotonic()))

    await asyncio.gather(*(site(s) for s in stubs))
    return latencies, errors


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scenario(
    name: str,
    stubs: list[pb_grpc.FederationStub],
    seconds: float,
    interval: float | None,
    pid: int,
) -> Result:
    started = time.monotonic()
    latencies, errors = await drive(stubs, seconds, interval)
    elapsed = time.monotonic() - started
    return Result(
        scenario=name,
        sites=len(stubs),
        seconds=round(elapsed, 1),
        calls=len(latencies),
        errors=dict(errors),
        req_per_s=round(len(latencies) / elapsed, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 1),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 1),
        coordinator_peak_rss_mb=round(peak_rss_mb(pid), 1),
    )


async def run(args: argparse.Namespace, address: str, ca_pem: bytes, sites: list[Site], pid: int):
    results = []
    fleet = Fleet(address, ca_pem, sites)
    try:
        await fleet.connect()
        anchor = await scenario(
            "anchor: 1 site flat out", fleet.stubs[:1], args.flat_seconds, None, pid
        )
        results.append(anchor)
        for count in args.sites:
            stubs = fleet.stubs[:count]
            results.append(
                await scenario(
                    f"{count} sites, 1 call / {args.interval:g} s",
                    stubs,
                    args.seconds,
                    args.interval,
                    pid,
                )
            )
            results.append(
                await scenario(f"{count} sites flat out", stubs, args.flat_seconds, None, pid)
            )
    finally:
        await fleet.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="100,1000", help="comma-separated site counts")
    parser.add_argument("--interval", type=float, default=10.0, help="paced: seconds per call")
    parser.add_argument("--seconds", type=float, default=30.0, help="paced: run length")
    parser.add_argument("--flat-seconds", type=float, default=10.0, help="flat out: run length")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.sites = [int(n) for n in args.sites.split(",")]

    with tempfile.TemporaryDirectory(prefix="atoll-load-") as tmp:
        state = init_federation(Path(tmp) / "coordinator", FEDERATION)
        sites = enrol_sites(state, max(args.sites))
        port = free_port()
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "coordinator"),
                "serve",
                "--state",
                str(state.root),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.2)
            results = asyncio.run(
                run(args, f"127.0.0.1:{port}", state.ca_cert.read_bytes(), sites, server.pid)
            )
        finally:
            server.terminate()
            server.wait(30)

    anchor = results[0]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    print(
        f"{'scenario':<30} {'req/s':>8} {'x anchor':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'p99 x anchor':>12} {'errors':>8} {'RSS MB':>7}"
    )
    for r in results:
        print(
            f"{r.scenario:<30} {r.req_per_s:>8.1f} {r.req_per_s / anchor.req_per_s:>8.2f} "
            f"{r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.p99_ms / anchor.p99_ms:>12.1f} "
            f"{sum(r.errors.values()):>8} {r.coordinator_peak_rss_mb:>7.0f}"
            + (f"  {r.errors}" if r.errors else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
