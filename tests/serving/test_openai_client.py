"""The official ``openai`` client against a real ``atoll serve`` on loopback: the same answers
as ``RoutedEnsemble.generate`` for the same inputs and seed, top-1 and top-2, streamed and
not; every bad input of the issue answered with an OpenAI-shaped error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from ensemble_runtime.builders import picture
from openai import BadRequestError, NotFoundError, OpenAI
from PIL import Image

from ensemble.runtime import RoutedEnsemble

from .servers import Served, data_url, user

pytestmark = pytest.mark.slow

CASES = [
    # (image, prompt, top_k, temperature, top_p, seed)
    (("red-square", 1), "What is in the picture?", None, 0.0, None, None),
    (("blue-circle", 2), "Describe it.", None, 0.0, None, None),
    (("blue-circle", 1), "What colour?", 2, 0.0, None, None),
    (None, "Tell me a joke.", None, 0.0, None, None),
    (("red-square", 2), "What is it?", None, 0.8, 0.9, 7),
    (("red-square", 3), "What is it?", 2, 0.8, 0.9, 8),
]


def _client(served: Served) -> OpenAI:
    return OpenAI(base_url=served.base_url, api_key="unused", max_retries=0)


def _expected(
    ensemble: RoutedEnsemble, image: Image.Image | None, prompt: str, top_k: int | None,
    temperature: float, top_p: float | None, seed: int | None,
) -> Any:  # fmt: skip
    return ensemble.generate_tokens(
        [image],
        [prompt],
        12,
        top_k=top_k,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_p=top_p or 1.0,
        seed=seed,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_answers_equal_the_in_process_ensemble(
    served: Served, ensemble: RoutedEnsemble, stream: bool
) -> None:
    client = _client(served)
    assert [m.id for m in client.models.list().data] == ["atoll"]
    answers = set()
    for kind, prompt, top_k, temperature, top_p, seed in CASES:
        image = picture(*kind) if kind else None
        expected = _expected(ensemble, image, prompt, top_k, temperature, top_p, seed)
        request: dict[str, Any] = {
            "model": "atoll",
            "messages": user(prompt, image),
            "max_tokens": 12,
            "temperature": temperature,
            "extra_body": {"top_k": top_k} if top_k else None,
        }
        if top_p is not None:
            request |= {"top_p": top_p, "seed": seed}
        if stream:
            pieces, routing, reasons = [], None, []
            for chunk in client.chat.completions.create(**request, stream=True):
                for choice in chunk.choices:
                    pieces.append(choice.delta.content or "")
                    reasons.append(choice.finish_reason)
                routing = (chunk.model_extra or {}).get("routing") or routing
            text = "".join(pieces)
            assert reasons[-1] == "length" and len([p for p in pieces if p]) > 1
        else:
            reply = client.chat.completions.create(**request)
            text = reply.choices[0].message.content or ""
            routing = (reply.model_extra or {})["routing"]
            assert reply.choices[0].finish_reason == "length"
            assert reply.usage is not None and reply.usage.completion_tokens == 12
        assert text == expected.texts[0], (kind, prompt, top_k)
        assert routing == {"experts": expected.experts[0], "weights": expected.weights[0]}
        answers.add(text)
    assert len(answers) == len(CASES)  # the cases differ, so equal answers mean something


def test_local_image_under_the_root(
    served: Served, ensemble: RoutedEnsemble, image_root: Path
) -> None:
    path = image_root / "blue.png"
    picture("blue-circle", 3).save(path)
    parts = [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": path.as_uri()}},
    ]
    reply = _client(served).chat.completions.create(
        model="atoll",
        messages=[{"role": "user", "content": parts}],  # type: ignore[list-item]
        max_tokens=8,
        temperature=0,
    )
    expected = ensemble.generate([path], ["What is it?"], 8)
    assert reply.choices[0].message.content == expected[0]
    assert (reply.model_extra or {})["routing"]["experts"] == [1]


def _error(served: Served, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
    url = f"{served.base_url}/chat/completions"
    if isinstance(body, bytes):
        reply = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        reply = httpx.post(url, json=body)
    error = reply.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    return reply.status_code, error


def test_bad_inputs_get_openai_errors(served: Served, tmp_path: Path) -> None:
    red = {"type": "image_url", "image_url": {"url": data_url(picture("red-square"))}}

    def ask(*parts: dict[str, Any], **fields: Any) -> dict[str, Any]:
        content = [*parts, {"type": "text", "text": "What?"}]
        return {"model": "atoll", "messages": [{"role": "user", "content": content}]} | fields

    status, error = _error(served, b'{"model": "atoll", "messages": [')
    assert status == 400 and "not valid JSON" in error["message"]
    remote = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}
    status, error = _error(served, ask(remote))
    assert status == 400 and "never fetched" in error["message"]
    assert error["code"] == "unsupported_image_url"
    outside = tmp_path / "outside.png"
    picture("red-square").save(outside)
    status, error = _error(
        served, ask({"type": "image_url", "image_url": {"url": outside.as_uri()}})
    )
    assert status == 400 and "outside the allowed image root" in error["message"]
    bad = "data:image/png;base64," + "bm90IGFuIGltYWdl"  # "not an image"
    status, error = _error(served, ask({"type": "image_url", "image_url": {"url": bad}}))
    assert status == 400 and "cannot decode the image" in error["message"]
    status, error = _error(served, ask(red, max_tokens=65))
    assert status == 400 and "65 is over this server's limit of 64" in error["message"]
    status, error = _error(served, ask(red, red))
    assert status == 400 and "2 images" in error["message"]
    status, error = _error(served, ask(red, model="gpt-4o"))
    assert status == 404 and error["code"] == "model_not_found" and "'gpt-4o'" in error["message"]
    status, error = _error(served, ask(red, temperature=-1))
    assert status == 400 and error["param"] == "temperature"
    client = _client(served)
    with pytest.raises(NotFoundError, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    with pytest.raises(BadRequestError, match="over this server's limit"):
        client.chat.completions.create(model="atoll", messages=user("hi"), max_tokens=100)
    # Still serving after all that.
    assert client.chat.completions.create(model="atoll", messages=user("hi"), max_tokens=2).choices
