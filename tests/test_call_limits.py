"""The coordinator under attack: calls that never send their request, streams left idle, and
downloads nobody reads must not freeze it (coordinator/call_limits.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.call_limits import CallLimits
from coordinator.server import build_server
from coordinator.servicer import Coordinator
from coordinator.state import StateDir
from protocol.identity import coordinator_dns_name
from protocol.messages import Heartbeat

# Small limits, so that every timeout in this file fires within a second or two.
SITE = CallLimits(idle_timeout=1.0, per_peer=4, max_calls=16)
ENROL = CallLimits(idle_timeout=1.0, per_peer=2, max_calls=4)
METHOD = "/atoll.federation.v1.Federation/"


@pytest.fixture
def limited(federation: StateDir) -> Iterator[Any]:
    from conftest import Running

    coordinator = Coordinator.open(federation, heartbeat_seconds=1)
    bound = build_server(coordinator, "127.0.0.1:0", "127.0.0.1:0", SITE, ENROL)
    bound.start()
    try:
        yield Running(federation, coordinator, bound)
    finally:
        bound.stop(grace=None)
        coordinator.store.close()


def _never(release: threading.Event) -> Iterator[Any]:
    """A request stream that sends nothing until released: a body that never arrives."""
    release.wait()
    return
    yield


def _stall(channel: grpc.Channel, method: str, release: threading.Event) -> grpc.Future:
    # A streaming call on a unary method's path: the server sees headers and no body.
    call = channel.stream_unary(METHOD + method)
    return call.future(_never(release))


def _codes(futures: list[grpc.Future], timeout: float) -> list[str]:
    codes = []
    for future in futures:
        try:
            future.result(timeout=timeout)
            codes.append("OK")
        except grpc.RpcError as error:
            codes.append(error.code().name)
    return codes


def _beat_seconds(client: Any) -> float:
    started = time.monotonic()
    client.heartbeat(Heartbeat(phase="waiting"))
    return time.monotonic() - started


def _settles(active: Any, within: float = 15.0) -> bool:
    """Whether ``active()`` drops to 0 within ``within`` seconds (a call's slot is released
    just after its status is sent)."""
    deadline = time.monotonic() + within
    while active() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(active() == 0)


def test_stalled_unauthenticated_calls_neither_freeze_sites_nor_last(
    limited: Any, tmp_path: Path
) -> None:
    site = limited.client(limited.enrol(tmp_path, "alpha"))
    release = threading.Event()
    channels = [
        grpc.secure_channel(
            limited.enrol_address,
            grpc.ssl_channel_credentials(limited.state.ca_cert.read_bytes()),
            options=[("grpc.ssl_target_name_override", coordinator_dns_name("testfed"))],
        )
        for _ in range(12)
    ]
    # 12 connections of 4 calls each (the enrolment server's stream cap per connection).
    stalled = [_stall(channels[i % 12], "Enroll", release) for i in range(48)]
    try:
        time.sleep(0.3)
        for _ in range(5):
            assert _beat_seconds(site) < 5.0
        # The enrolment server cancels what waited past its idle timeout, refused the rest.
        codes = _codes(stalled, timeout=10.0)
        # At most max_calls were admitted, each cancelled after its idle timeout.
        assert codes.count("CANCELLED") <= ENROL.max_calls, codes
        assert set(codes) == {"CANCELLED", "RESOURCE_EXHAUSTED"}, codes
    finally:
        release.set()
        for channel in channels:
            channel.close()
    # ...and it enrols a real site afterwards.
    limited.enrol(tmp_path, "beta")
    assert _settles(lambda: limited.bound.enrol_guard.active("ipv4:127.0.0.1"))


def test_idle_upload_streams_of_one_site_are_capped_and_cancelled(
    limited: Any, tmp_path: Path
) -> None:
    attacker = limited.client(limited.enrol(tmp_path, "mallory"))
    honest = limited.client(limited.enrol(tmp_path, "alpha"))
    release = threading.Event()
    channel = attacker._channel
    idle = [_stall(channel, "UploadChunk", release) for _ in range(16)]
    try:
        time.sleep(0.3)
        assert _beat_seconds(honest) < 5.0
        codes = _codes(idle, timeout=10.0)
        assert codes.count("RESOURCE_EXHAUSTED") >= 16 - SITE.per_peer, codes
        assert set(codes) <= {"RESOURCE_EXHAUSTED", "CANCELLED"}, codes
    finally:
        release.set()
    # The attacker's own calls work again once its stalled ones are gone.
    assert attacker.heartbeat(Heartbeat(phase="waiting")).next_heartbeat_seconds == 1


def test_unread_download_is_cancelled_and_frees_its_slot(limited: Any, tmp_path: Path) -> None:
    limited.add_plan(1, {"big.bin": os.urandom(48 << 20)})
    site = limited.client(limited.enrol(tmp_path, "alpha"))
    ref = next(a for a in site.get_assignment().artifacts if a.name.endswith("big.bin"))
    stream = site.download_stream(ref.name, 0)
    next(stream)  # the header, then nobody reads: flow control stops the server
    assert limited.bound.guard.active("spiffe://testfed/site/alpha") == 1
    assert _settles(lambda: limited.bound.guard.active("spiffe://testfed/site/alpha"))
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    assert caught.value.code() is grpc.StatusCode.CANCELLED
