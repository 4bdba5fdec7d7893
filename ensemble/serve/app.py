"""The ASGI application: OpenAI's routes over a backend (in-process ensemble or forwarding).

``/v1/models`` lists the served model; ``/v1/chat/completions`` validates the request here
(malformed JSON, unknown fields' types, an unknown model: OpenAI-shaped errors) and hands it
to the backend, which answers with JSON or a server-sent event stream.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from ensemble.serve.schema import ChatCompletionRequest, ModelCard, ModelList, ServeError

__all__ = ["Backend", "create_app", "sse"]


class Backend(Protocol):
    """Answers validated chat requests (a JSON or a streaming response)."""

    async def chat(self, request: ChatCompletionRequest) -> Response: ...

    async def close(self) -> None: ...


def sse(payload: str) -> str:
    """One server-sent event carrying ``payload``."""
    return f"data: {payload}\n\n"


def create_app(backend: Backend, model_name: str) -> FastAPI:
    """The application serving ``backend`` as model ``model_name``."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(title="Atoll", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ServeError)
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return ModelList(data=[ModelCard(id=model_name)]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request) -> Response:
        body = await http.body()
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ServeError(400, f"request body: not valid JSON ({error})") from None
        try:
            request = ChatCompletionRequest.model_validate(data)
        except ValidationError as error:
            raise ServeError(400, _validation_message(error), param=_first_field(error)) from None
        if request.model != model_name:
            raise ServeError(
                404,
                f"model: {request.model!r} is not served here (this server serves "
                f"{model_name!r}; see /v1/models)",
                param="model",
                code="model_not_found",
            )
        if request.stop:
            raise ServeError(400, "stop: stop sequences are not supported", param="stop")
        return await backend.chat(request)

    return app


def _location(error: dict[str, object]) -> str:
    return ".".join(str(part) for part in error["loc"]) or "request"  # type: ignore[attr-defined]


def _first_field(error: ValidationError) -> str | None:
    errors = error.errors()
    return _location(dict(errors[0])) if errors else None


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        got = item.get("input")
        shown = "" if isinstance(got, dict | list) else f", got {got!r}"
        parts.append(f"{_location(dict(item))}: {item['msg']}{shown}")
    return "; ".join(parts)
