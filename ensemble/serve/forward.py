"""The scale-out backend: the CLIP router in front, each request forwarded to its expert's own
OpenAI-compatible server (one vLLM/SGLang/``atoll serve`` per full expert; for LoRA experts one
server with every adapter loaded, the adapter chosen by the ``model`` field).

Only top-1 can be forwarded: mixing experts' next-token probabilities needs every expert's
logits at every step, in one process. Text-only prompts are forwarded only when the ensemble
routes them by ``clip-text``; ``uniform`` and ``posterior`` mix experts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ensemble.router import load_feature_model, load_router
from ensemble.serve.app import sse
from ensemble.serve.prompt import image_data_url, read_prompt
from ensemble.serve.schema import ChatCompletionRequest, Routing, ServeError
from protocol.ensemble_manifest import (
    EnsembleManifest,
    TextOnlyStrategy,
    load_manifest,
    verify_files,
)
from protocol.errors import InvalidArgument

__all__ = ["Endpoint", "ForwardBackend", "parse_endpoints"]


@dataclass(frozen=True)
class Endpoint:
    """Expert ``expert``'s server: its OpenAI base URL (``.../v1``) and the model name that
    selects the expert there (a LoRA adapter's name on a multi-adapter server)."""

    expert: int
    base_url: str
    model: str


def parse_endpoints(specs: list[str], models: list[str]) -> dict[int, Endpoint]:
    """``--expert-endpoint K=URL`` and ``--expert-model K=NAME`` flags as endpoints (the
    model defaults to ``expert-K``, the name to give each adapter or served model).

    Raises:
        InvalidArgument: a flag not of the form ``K=VALUE``, a repeated or unknown ``K``.
    """
    urls = _pairs("--expert-endpoint", specs)
    names = _pairs("--expert-model", models)
    for k in names:
        if k not in urls:
            raise InvalidArgument(f"--expert-model {k}=...: expert {k} has no --expert-endpoint")
    for k, url in urls.items():
        if not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"--expert-endpoint {k}={url}: expected an http(s):// URL")
    return {k: Endpoint(k, url.rstrip("/"), names.get(k, f"expert-{k}")) for k, url in urls.items()}


def _pairs(flag: str, specs: list[str]) -> dict[int, str]:
    pairs: dict[int, str] = {}
    for spec in specs:
        key, equals, value = spec.partition("=")
        if not equals or not key.strip().isdigit() or not value:
            raise InvalidArgument(f"{flag} {spec!r}: expected K=VALUE with K an expert index")
        k = int(key)
        if k in pairs:
            raise InvalidArgument(f"{flag}: expert {k} given twice")
        pairs[k] = value
    return pairs


class ForwardBackend:
    """Routes each request with the ensemble's router and forwards it to one expert's server.

    Args:
        directory: The ensemble directory (only the manifest and the router are read).
        endpoints: Every present expert's server.
        model_name: The served name (responses carry it).
        image_root: The folder ``file://`` images must be under.
        timeout_s: Longest a forwarded request may take.
        verify: Check the router's files against the manifest first.

    Raises:
        InvalidArgument: an endpoint for an expert the ensemble lacks, or none for one it has.
    """

    def __init__(
        self,
        directory: Path,
        endpoints: dict[int, Endpoint],
        model_name: str,
        *,
        image_root: Path | None = None,
        timeout_s: float = 300.0,
        verify: bool = True,
        device: str | None = None,
    ) -> None:
        manifest = load_manifest(directory)
        present = manifest.present_experts
        unknown = sorted(set(endpoints) - set(present))
        if unknown:
            raise InvalidArgument(
                f"--expert-endpoint: experts {unknown} are not in the ensemble (present: {present})"
            )
        missing = sorted(set(present) - set(endpoints))
        if missing:
            raise InvalidArgument(
                f"--expert-endpoint: no endpoint for experts {missing} (every present expert "
                "needs its server)"
            )
        if verify:
            verify_files(directory, _router_only(manifest))
        self.manifest = manifest
        # The ensemble's own router (centroids, center, tau); top-1 is asked per request.
        self.router = load_router(directory, manifest)
        if manifest.router.encoder is None:
            raise InvalidArgument(
                "--backend openai: this ensemble's experts were trained on text only; every "
                "prompt mixes them (posterior), so none can be forwarded to one expert"
            )
        self.features = load_feature_model(manifest.router.encoder, directory, device=device)
        self.endpoints = endpoints
        self.model_name = model_name
        self.image_root = image_root
        self.client = httpx.AsyncClient(timeout=timeout_s)

    async def close(self) -> None:
        await self.client.aclose()

    async def chat(self, request: ChatCompletionRequest) -> Response:
        if request.top_k is not None and request.top_k > 1:
            raise ServeError(
                400,
                f"top_k: {request.top_k} experts cannot be mixed by this server (--backend "
                "openai forwards each request to one expert's server; mixing needs every "
                "expert in one process: run atoll serve without --backend openai)",
                param="top_k",
            )
        prompt = read_prompt(request, self.image_root)
        with torch.inference_mode():
            if prompt.image is not None:
                features = self.features.encode_images([prompt.image])
            elif self.manifest.router.text_only is TextOnlyStrategy.CLIP_TEXT:
                features = self.features.encode_texts([prompt.text])
            else:
                raise ServeError(
                    400,
                    f"messages: a text-only prompt routes by {self.manifest.router.text_only.value!r}"
                    " in this ensemble, which mixes experts; only 'clip-text' routing can be "
                    "forwarded to one expert's server",
                    param="messages",
                )
        routing = self.router.route(features, 1)
        expert = int(routing.experts[0, 0])
        endpoint = self.endpoints[expert]
        body = self._forwarded(request, endpoint, prompt.image)
        extension = Routing(experts=[expert], weights=[1.0]).model_dump()
        if request.stream:
            return StreamingResponse(
                self._stream(endpoint, body, extension), media_type="text/event-stream"
            )
        try:
            reply = await self.client.post(f"{endpoint.base_url}/chat/completions", json=body)
        except httpx.HTTPError as error:
            raise _unreachable(endpoint, error) from None
        answer = _json(reply, endpoint)
        if reply.status_code != 200:
            return JSONResponse(answer, status_code=reply.status_code)
        answer.update(model=self.model_name, routing=extension)
        return JSONResponse(answer)

    def _forwarded(
        self, request: ChatCompletionRequest, endpoint: Endpoint, image: Any
    ) -> dict[str, Any]:
        body = request.model_dump(exclude_none=True, exclude={"top_k"})
        body["model"] = endpoint.model
        if image is not None:
            # The expert's server cannot read this machine's files: the decoded image travels
            # as a PNG data URL (lossless, so it sees the pixels routed here).
            for part in body["messages"][0]["content"]:
                if part["type"] == "image_url":
                    part["image_url"] = {"url": image_data_url(image)}
        return body

    async def _stream(
        self, endpoint: Endpoint, body: dict[str, Any], extension: dict[str, Any]
    ) -> AsyncIterator[str]:
        url = f"{endpoint.base_url}/chat/completions"
        try:
            async with self.client.stream("POST", url, json=body) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    yield sse(json.dumps(_json(reply, endpoint)))
                    return
                first = True
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:") :].strip()
                    if payload == "[DONE]":
                        yield sse(payload)
                        return
                    chunk = json.loads(payload)
                    if "choices" in chunk:
                        chunk["model"] = self.model_name
                        if first:
                            chunk["routing"] = extension
                            first = False
                    yield sse(json.dumps(chunk))
        except httpx.HTTPError as error:
            yield sse(json.dumps(_unreachable(endpoint, error).body()))


def _unreachable(endpoint: Endpoint, error: Exception) -> ServeError:
    return ServeError(
        502,
        f"expert {endpoint.expert}'s server at {endpoint.base_url} did not answer "
        f"({type(error).__name__}: {error})",
        type="server_error",
        code="expert_unavailable",
    )


def _json(reply: httpx.Response, endpoint: Endpoint) -> dict[str, Any]:
    try:
        answer = reply.json()
    except ValueError:
        raise ServeError(
            502,
            f"expert {endpoint.expert}'s server at {endpoint.base_url} answered HTTP "
            f"{reply.status_code} with a body that is not JSON",
            type="server_error",
            code="expert_bad_reply",
        ) from None
    if not isinstance(answer, dict):
        raise ServeError(502, f"expert {endpoint.expert}'s server answered {answer!r}")
    return answer


def _router_only(manifest: EnsembleManifest) -> EnsembleManifest:
    """The manifest with no experts present and no base: what verifying the router checks
    (the experts' weights live on their own servers)."""
    experts = [e.model_copy(update={"present": False, "files": {}}) for e in manifest.experts]
    return manifest.model_copy(update={"experts": experts, "base": None})
