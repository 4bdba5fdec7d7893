"""The in-process server's batching and flow control, with ``atoll serve``'s app in a
uvicorn thread on loopback: concurrent requests share one batch, requests that arrive while
it decodes join it and answer as they would alone, a full queue answers 429, a slow request
504, and a client leaving mid-stream stops its generation and frees its slot."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from ensemble_runtime.builders import picture

from ensemble.running_batch import RunningBatch
from ensemble.runtime import RoutedEnsemble
from ensemble.serve.app import create_app
from ensemble.serve.engine import Engine
from ensemble.serve.local import LocalBackend

from .servers import free_port, user


@contextlib.contextmanager
def running(
    ensemble: RoutedEnsemble, timeout_s: float = 120.0, **engine: Any
) -> Iterator[tuple[str, Engine]]:
    """The app over a fresh engine, served by uvicorn in a thread."""
    worker = Engine(ensemble, **engine)
    worker.start()
    app = create_app(LocalBackend(worker, "atoll", max_tokens=64, timeout_s=timeout_s), "atoll")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1/chat/completions", worker
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Gate:
    """Holds the engine's generation until opened, and slows every decoding step by
    ``step_s`` (so a test can act while a request decodes): both the running batch that
    top-1 requests join and the whole ``generate_tokens`` calls of the others."""

    def __init__(
        self, ensemble: RoutedEnsemble, monkeypatch: pytest.MonkeyPatch, step_s: float = 0.0
    ) -> None:
        self.opened = threading.Event()
        self.returned = threading.Event()  # a call returned, or a request left the batch
        self.steps = 0
        self.joined_into: list[int] = []  # rows decoding when each join came
        original = ensemble.generate_tokens

        def gated(*args: Any, watch: Any = None, **kwargs: Any) -> Any:
            self.opened.wait(timeout=60)

            def slow(samples: list[int], tokens: list[int]) -> list[bool]:
                self.steps += 1
                time.sleep(step_s)
                return watch(samples, tokens) if watch else [False] * len(samples)

            try:
                return original(*args, watch=slow, **kwargs)
            finally:
                self.returned.set()

        monkeypatch.setattr(ensemble, "generate_tokens", gated)
        join, choose, leave = RunningBatch.join, RunningBatch.choose, RunningBatch.leave

        def gated_join(batch: RunningBatch, *args: Any) -> Any:
            self.opened.wait(timeout=60)
            self.joined_into.append(batch.live)
            return join(batch, *args)

        def slow_choose(batch: RunningBatch) -> Any:
            self.steps += 1
            time.sleep(step_s)
            return choose(batch)

        def watched_leave(batch: RunningBatch, rows: Any) -> None:
            leave(batch, rows)
            if rows:
                self.returned.set()

        monkeypatch.setattr(RunningBatch, "join", gated_join)
        monkeypatch.setattr(RunningBatch, "choose", slow_choose)
        monkeypatch.setattr(RunningBatch, "leave", watched_leave)


def _body(
    kind: str = "red-square", variant: int = 1, max_tokens: int = 8, **fields: Any
) -> dict[str, Any]:
    messages = user("What is in the picture?", picture(kind, variant))
    return {
        "model": "atoll",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
    } | fields


def _wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_concurrent_requests_run_as_one_batch(ensemble: RoutedEnsemble) -> None:
    requests = [("red-square", 1), ("blue-circle", 1), ("red-square", 2), ("blue-circle", 3)]
    answers: dict[int, Any] = {}
    with running(ensemble, window_s=1.0, max_batch=4) as (url, engine):

        def send(i: int) -> None:
            answers[i] = httpx.post(
                url, json=_body(*requests[i], max_tokens=6 + i), timeout=60
            ).json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert engine.batches == [4]
    for i, (kind, variant) in enumerate(requests):
        # Each its own max_tokens inside one call, and each the answer it gets alone.
        alone = ensemble.generate_tokens(
            [picture(kind, variant)], ["What is in the picture?"], 6 + i
        )
        assert answers[i]["choices"][0]["message"]["content"] == alone.texts[0]
        assert answers[i]["usage"]["completion_tokens"] == 6 + i
        assert answers[i]["routing"]["experts"] == alone.experts[0]


def test_a_full_queue_answers_429(
    ensemble: RoutedEnsemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(ensemble, monkeypatch)
    replies: list[httpx.Response] = []
    with running(ensemble, max_queue=2, max_batch=1) as (url, engine):
        waiting = [
            threading.Thread(
                target=lambda: replies.append(httpx.post(url, json=_body(), timeout=60))
            )
            for _ in range(2)
        ]
        for thread in waiting:
            thread.start()
        _wait_for(lambda: engine.admitted == 2)
        refused = httpx.post(url, json=_body(), timeout=60)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "--max-queue 2" in refused.json()["error"]["message"]
        gate.opened.set()
        for thread in waiting:
            thread.join()
        assert [r.status_code for r in replies] == [200, 200]
        assert engine.admitted == 0


def test_a_request_past_its_timeout_answers_504(
    ensemble: RoutedEnsemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(ensemble, monkeypatch)
    with running(ensemble, timeout_s=0.5) as (url, engine):
        reply = httpx.post(url, json=_body(), timeout=60)
        assert reply.status_code == 504
        assert reply.json()["error"] == {
            "message": "request timed out after 0.5 s (--timeout)",
            "type": "timeout",
            "code": "timeout",
            "param": None,
        }
        assert engine.admitted == 0  # its slot is free at once
        gate.opened.set()
        assert gate.returned.wait(30)
        assert gate.steps == 1  # the timed-out request stopped at its first token


def test_a_client_leaving_mid_stream_stops_its_generation(
    ensemble: RoutedEnsemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(ensemble, monkeypatch, step_s=0.05)
    gate.opened.set()
    with running(ensemble, max_queue=1) as (url, engine):
        with httpx.stream("POST", url, json=_body(max_tokens=64, stream=True), timeout=60) as reply:
            assert reply.status_code == 200
            contents = 0
            for line in reply.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    contents += 1
                if contents == 2:
                    break  # leave: the connection closes with the block
        assert gate.returned.wait(30)
        assert 2 <= gate.steps < 20  # far short of 64 tokens
        _wait_for(lambda: engine.admitted == 0)
        # Its slot (the only one) is free: the next request is answered.
        assert httpx.post(url, json=_body(max_tokens=2), timeout=60).status_code == 200


def _alone(ensemble: RoutedEnsemble, body: dict[str, Any], kind: str, variant: int) -> Any:
    """What ``generate`` answers for the request's prompt alone."""
    return ensemble.generate_tokens(
        [picture(kind, variant)],
        ["What is in the picture?"],
        body["max_tokens"],
        do_sample=body["temperature"] > 0,
        temperature=body["temperature"] or 1.0,
        top_p=body.get("top_p", 1.0),
        seed=body.get("seed"),
    )


def test_requests_joining_a_running_batch_answer_as_alone(
    ensemble: RoutedEnsemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(ensemble, monkeypatch, step_s=0.05)
    gate.opened.set()
    requests = [
        (("red-square", 1), _body("red-square", 1, max_tokens=16)),
        (("blue-circle", 2), _body("blue-circle", 2, max_tokens=8)),
        # Seeded sampling draws from the request's own generator: as generate samples alone.
        (
            ("red-square", 3),
            _body("red-square", 3, max_tokens=8, temperature=0.8, top_p=0.9, seed=7),
        ),
        (("blue-circle", 1), _body("blue-circle", 1, max_tokens=6, stream=True)),
    ]
    answers: dict[int, str] = {}
    with running(ensemble, window_s=0.01, max_batch=4) as (url, engine):

        def send(i: int) -> None:
            body = requests[i][1]
            if body.get("stream"):
                with httpx.stream("POST", url, json=body, timeout=60) as reply:
                    pieces = [
                        json.loads(line[len("data: ") :])["choices"]
                        for line in reply.iter_lines()
                        if line.startswith("data: {")
                    ]
                answers[i] = "".join(c[0]["delta"].get("content") or "" for c in pieces if c)
            else:
                reply = httpx.post(url, json=body, timeout=60).json()
                answers[i] = reply["choices"][0]["message"]["content"]

        first = threading.Thread(target=send, args=(0,))
        first.start()
        _wait_for(lambda: gate.steps >= 3)  # the first request is decoding
        later = [threading.Thread(target=send, args=(i,)) for i in range(1, len(requests))]
        for thread in later:
            thread.start()
            time.sleep(0.1)  # one by one, a couple of steps apart
        for thread in [first, *later]:
            thread.join()
        assert engine.admitted == 0
    # The later requests joined while the first one was decoding, not after it ended.
    assert gate.joined_into[0] == 0 and all(live > 0 for live in gate.joined_into[1:])
    assert len(gate.joined_into) > 1
    for i, ((kind, variant), body) in enumerate(requests):
        assert answers[i] == _alone(ensemble, body, kind, variant).texts[0], i


def test_a_client_leaving_mid_stream_frees_its_slot_in_the_running_batch(
    ensemble: RoutedEnsemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(ensemble, monkeypatch, step_s=0.05)
    gate.opened.set()
    long = _body("red-square", 1, max_tokens=40)
    late = _body("blue-circle", 2, max_tokens=6)
    answers: dict[str, str] = {}
    with running(ensemble, window_s=0.01, max_batch=2) as (url, engine):

        def send(name: str, body: dict[str, Any]) -> None:
            reply = httpx.post(url, json=body, timeout=60).json()
            answers[name] = reply["choices"][0]["message"]["content"]

        first = threading.Thread(target=send, args=("long", long))
        first.start()
        _wait_for(lambda: gate.steps >= 2)
        leaving = _body("blue-circle", 3, max_tokens=40, stream=True)
        with httpx.stream("POST", url, json=leaving, timeout=60) as reply:
            contents = 0
            for line in reply.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    contents += 1
                if contents == 2:
                    break  # leave mid-stream: its row stops, its slot is free
        assert gate.joined_into == [0, 1]  # both slots taken
        # The long request still decodes in the other slot; the late one takes the freed one.
        send("late", late)
        assert first.is_alive()
        first.join()
        _wait_for(lambda: engine.admitted == 0)
    assert gate.joined_into == [0, 1, 1]
    assert answers["late"] == _alone(ensemble, late, "blue-circle", 2).texts[0]
    assert answers["long"] == _alone(ensemble, long, "red-square", 1).texts[0]


def test_mixtures_arriving_while_a_batch_decodes_answer_as_alone(
    ensemble: RoutedEnsemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(ensemble, monkeypatch, step_s=0.02)
    gate.opened.set()
    top1 = _body("red-square", 1, max_tokens=24)
    mixed = [
        _body("blue-circle", 2, max_tokens=8, top_k=2),
        _body("red-square", 3, max_tokens=8, top_k=2, temperature=0.8, top_p=0.9, seed=5),
    ]
    answers: dict[int, str] = {}
    with running(ensemble, window_s=0.05, max_batch=4) as (url, engine):

        def send(i: int, body: dict[str, Any]) -> None:
            reply = httpx.post(url, json=body, timeout=60).json()
            answers[i] = reply["choices"][0]["message"]["content"]

        first = threading.Thread(target=send, args=(0, top1))
        first.start()
        _wait_for(lambda: gate.steps >= 3)
        later = [threading.Thread(target=send, args=(i + 1, b)) for i, b in enumerate(mixed)]
        for thread in later:
            thread.start()
        for thread in [first, *later]:
            thread.join()
        assert engine.joins == [1]  # the mixtures ran as whole calls beside the batch
    assert answers[0] == _alone(ensemble, top1, "red-square", 1).texts[0]
    for i, (kind, variant) in enumerate([("blue-circle", 2), ("red-square", 3)]):
        body = mixed[i]
        alone = ensemble.generate_tokens(
            [picture(kind, variant)],
            ["What is in the picture?"],
            body["max_tokens"],
            top_k=2,
            do_sample=body["temperature"] > 0,
            temperature=body["temperature"] or 1.0,
            top_p=body.get("top_p", 1.0),
            seed=body.get("seed"),
        )
        assert answers[i + 1] == alone.texts[0], i
