"""The in-process backend: requests answered by the ensemble loaded in this server, batched
by :class:`ensemble.serve.engine.Engine`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.responses import JSONResponse, Response, StreamingResponse

from ensemble.serve.app import sse
from ensemble.serve.engine import Engine
from ensemble.serve.job import Event, Job, QueueFull
from ensemble.serve.prompt import read_prompt
from ensemble.serve.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Routing,
    ServeError,
    Usage,
    completion_id,
)
from protocol.errors import AtollError

__all__ = ["LocalBackend"]


class LocalBackend:
    """Answers with the engine's ensemble.

    Args:
        engine: The started engine.
        model_name: The served model's name (responses carry it).
        image_root: The folder ``file://`` images must be under (None: refuse them).
        max_tokens: The most tokens a request may ask for (also the default).
        timeout_s: Longest a request may wait and generate before it gets 504.
    """

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        *,
        image_root: Path | None = None,
        max_tokens: int = 256,
        timeout_s: float = 300.0,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.image_root = image_root
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.stop)

    async def chat(self, request: ChatCompletionRequest) -> Response:
        job = self._job(request)
        try:
            self.engine.submit(job)
        except QueueFull as error:
            raise ServeError(
                429,
                f"server busy: {error}; retry later",
                type="requests",
                code="rate_limit_exceeded",
            ) from None
        deadline = time.monotonic() + self.timeout_s
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            stream = self._stream(job, deadline, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            done = await self._until_done(job, deadline)
        finally:
            self.engine.cancel(job)  # frees the slot; a no-op for a finished job
        answer = ChatCompletion(
            id=completion_id(),
            model=self.model_name,
            choices=[
                Choice(
                    message=AssistantMessage(content=done.text),
                    finish_reason="stop" if done.finish_reason == "stop" else "length",
                )
            ],
            usage=self._usage(job, done),
            routing=Routing(experts=done.experts, weights=done.weights),
        )
        return JSONResponse(answer.model_dump())

    def _job(self, request: ChatCompletionRequest) -> Job:
        limit = request.answer_limit()
        if limit is not None and limit > self.max_tokens:
            raise ServeError(
                400,
                f"max_tokens: {limit} is over this server's limit of {self.max_tokens}",
                param="max_tokens",
            )
        prompt = read_prompt(request, self.image_root)
        sampled = request.sampled()
        return Job(
            image=prompt.image,
            prompt=prompt.text,
            max_tokens=limit or self.max_tokens,
            top_k=request.top_k,
            do_sample=sampled,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stream=request.stream,
            loop=asyncio.get_running_loop(),
        )

    async def _next(self, job: Job, deadline: float) -> Event:
        try:
            event = await asyncio.wait_for(job.events.get(), deadline - time.monotonic())
        except TimeoutError:
            self.engine.cancel(job)
            raise ServeError(
                504,
                f"request timed out after {self.timeout_s:g} s (--timeout)",
                type="timeout",
                code="timeout",
            ) from None
        if event.kind == "error":
            error = event.error
            if isinstance(error, AtollError):
                raise ServeError(400, str(error))
            raise ServeError(500, f"generation failed ({error})", type="server_error")
        return event

    async def _until_done(self, job: Job, deadline: float) -> Event:
        while True:
            event = await self._next(job, deadline)
            if event.kind == "done":
                return Event(
                    "done",
                    text=job.sent + event.text,
                    finish_reason=event.finish_reason,
                    token_ids=event.token_ids,
                    experts=event.experts,
                    weights=event.weights,
                )

    async def _stream(self, job: Job, deadline: float, include_usage: bool) -> AsyncIterator[str]:
        """The answer as chat.completion.chunk events; a client that leaves (Starlette
        cancels this generator) stops the job's generation and frees its slot."""
        ident = completion_id()

        def chunk(delta: Delta, reason: str | None = None, routing: Routing | None = None) -> str:
            choices = [ChunkChoice(delta=delta, finish_reason=reason)]  # type: ignore[arg-type]
            body = ChatCompletionChunk(
                id=ident, model=self.model_name, choices=choices, routing=routing
            )
            return sse(body.model_dump_json(exclude_none=True))

        try:
            yield chunk(Delta(role="assistant", content=""))
            while True:
                try:
                    event = await self._next(job, deadline)
                except ServeError as error:
                    yield sse(json.dumps(error.body()))
                    break
                if event.kind == "delta":
                    yield chunk(Delta(content=event.text))
                    continue
                if event.text:
                    yield chunk(Delta(content=event.text))
                routing = Routing(experts=event.experts, weights=event.weights)
                reason = "stop" if event.finish_reason == "stop" else "length"
                yield chunk(Delta(), reason, routing=routing)
                if include_usage:
                    usage = self._usage(job, event)
                    body = ChatCompletionChunk(
                        id=ident, model=self.model_name, choices=[], usage=usage
                    )
                    yield sse(body.model_dump_json())
                break
            yield sse("[DONE]")
        finally:
            self.engine.cancel(job)

    def _usage(self, job: Job, done: Event) -> Usage:
        text = self.engine.ensemble.prompt_text(job.prompt, job.image is not None)
        prompt = len(self.engine.ensemble.tokenizer(text).input_ids)
        completion = len(done.token_ids) + int(job.ended)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
