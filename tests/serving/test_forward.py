"""``atoll serve --backend openai``: the router in front of K single-expert ``atoll serve``
processes answers exactly as the in-process top-1 ensemble; top-k > 1 is refused, and a
backend that is down answers 502 naming its expert."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from ensemble_runtime.builders import picture, write_manifest
from openai import APIStatusError, BadRequestError, OpenAI

from ensemble.runtime import RoutedEnsemble
from protocol.ensemble_manifest import expert_path

from .servers import Served, free_port, serve_all, user

pytestmark = pytest.mark.slow


def single_expert(ensemble_dir: Path, keep: int, target: Path) -> Path:
    """A copy of the ensemble holding only expert ``keep`` (what one site would serve)."""
    shutil.copytree(ensemble_dir, target)
    for other in (target / "experts").iterdir():
        if other.name != Path(expert_path(keep)).name:
            shutil.rmtree(other)
    write_manifest(target, allow_partial=True, num_experts=2)
    return target


@pytest.fixture(scope="module")
def fronts(ensemble_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Served]]:
    """Started together: expert 0's and expert 1's own ``atoll serve`` (single-expert
    ensembles), the front over them, and a front whose endpoints nobody listens on."""
    work = tmp_path_factory.mktemp("forward")
    ports = [free_port() for _ in range(4)]
    specs = []
    for k in (0, 1):
        folder = single_expert(ensemble_dir, k, work / f"expert-{k}-only")
        args = ["--ensemble", str(folder), "--served-model-name", f"expert-{k}"]
        specs.append((args, work / f"expert-{k}.log"))
    for name, endpoint_ports in (("front", ports[:2]), ("dead-front", [free_port()] * 2)):
        args = ["--ensemble", str(ensemble_dir), "--backend", "openai"]
        for k, port in enumerate(endpoint_ports):
            args += ["--expert-endpoint", f"{k}=http://127.0.0.1:{port}/v1"]
        specs.append((args, work / f"{name}.log"))
    with serve_all(specs, ports=ports) as served:
        yield served


def test_the_front_answers_as_the_in_process_top1(
    fronts: list[Served], ensemble: RoutedEnsemble
) -> None:
    client = OpenAI(base_url=fronts[2].base_url, api_key="unused", max_retries=0)
    cases = [
        (("red-square", 1), 0.0, None),
        (("blue-circle", 2), 0.0, None),
        (("blue-circle", 1), 0.7, 3),
    ]
    for (kind, variant), temperature, seed in cases:
        image = picture(kind, variant)
        expected = ensemble.generate_tokens(
            [image], ["What is it?"], 10, top_k=1, do_sample=temperature > 0,
            temperature=temperature or 1.0, seed=seed,
        )  # fmt: skip
        reply = client.chat.completions.create(
            model="atoll", messages=user("What is it?", image), max_tokens=10,
            temperature=temperature, seed=seed,
        )  # fmt: skip
        assert reply.choices[0].message.content == expected.texts[0]
        assert (reply.model_extra or {})["routing"] == {
            "experts": expected.experts[0],
            "weights": [1.0],
        }
        assert reply.model == "atoll"
        streamed = client.chat.completions.create(
            model="atoll", messages=user("What is it?", image), max_tokens=10,
            temperature=temperature, seed=seed, stream=True,
        )  # fmt: skip
        assert (
            "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            == expected.texts[0]
        )
    with pytest.raises(BadRequestError, match="every expert in one process"):
        client.chat.completions.create(
            model="atoll", messages=user("x", picture("red-square")), extra_body={"top_k": 2}
        )
    with pytest.raises(BadRequestError, match="'posterior'"):
        client.chat.completions.create(model="atoll", messages=user("Tell me a joke."))


def test_a_backend_that_is_down_answers_502(fronts: list[Served]) -> None:
    client = OpenAI(base_url=fronts[3].base_url, api_key="unused", max_retries=0)
    with pytest.raises(APIStatusError) as raised:
        client.chat.completions.create(
            model="atoll", messages=user("x", picture("blue-circle")), max_tokens=4
        )
    assert raised.value.status_code == 502
    assert raised.value.body["code"] == "expert_unavailable"  # type: ignore[index]
    assert "expert 1's server at http://127.0.0.1:" in str(raised.value)
    assert "did not answer (ConnectError" in str(raised.value)
