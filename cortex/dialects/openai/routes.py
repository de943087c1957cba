"""OpenAI routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

Each handler parses its body, translates it into a `JobDraft`, and hands over to dispatch; the 200
is committed only after a neuron accepted the job, so every refusal keeps its real status. After
that, failures become an error event inside the stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Protocol

from litestar import Response, Router, post
from litestar.response import Stream

from bus_schema.messages import JobAccepted
from cortex.answer import Rendering, answer
from cortex.bus import JobStream
from cortex.context import Gateway
from cortex.dialects.openai import render, translate
from cortex.dialects.openai.shapes import StreamOptions
from cortex.dispatch import JobDraft, stamp
from cortex.errors import ApiError
from cortex.http import (
    AnyRequest,
    json_body,
    json_response,
    write_batches,
)
from cortex.relay import Completion, relay


class _Body(Protocol):
    def __call__(self, done: Completion, *, completion_id: str, created: int,
                 model: str) -> bytes: ...


async def _answer(
    request: AnyRequest, gw: Gateway, draft: JobDraft, *,
    streaming: bool, include_usage: bool, id_prefix: str,
    chunks: type[render.ChatChunks | render.TextChunks],
    body: _Body,
) -> Response[bytes] | Stream:
    """Run ``draft`` and answer in OpenAI's shapes (`cortex.answer`)."""
    job = stamp(draft, gw.settings)
    completion_id, created = f"{id_prefix}-{job.job_id}", int(time.time())

    def events_for(stream: JobStream, accepted: JobAccepted) -> AsyncIterator[bytes]:
        events = chunks(completion_id=completion_id, created=created, model=draft.model,
                        include_usage=include_usage)
        return write_batches(relay(stream, accepted), events.render, opening=events.opening())

    def one_body(done: Completion) -> bytes:
        return body(done, completion_id=completion_id, created=created, model=draft.model)

    return await answer(request, gw, job, streaming=streaming,
                        headers={"x-request-id": job.job_id},
                        rendering=Rendering(begin=events_for, keepalive=render.KEEPALIVE,
                                            failed=render.stream_error, body=one_body))


def _include_usage(options: StreamOptions | None) -> bool:
    return bool(options and options.include_usage)


def error_response(error: ApiError) -> Response[bytes]:
    """An error before the response started, in OpenAI's shape."""
    return json_response(render.error_body(error), status=error.spec.status,
                         headers=error.headers())


def router(gw: Gateway) -> Router:
    """The OpenAI routes, working with ``gw``."""

    @post("/chat/completions", status_code=200)
    async def chat_completions(request: AnyRequest) -> Response[bytes] | Stream:
        body = translate.parse_chat_request(await json_body(request))
        draft = translate.chat_draft(body, model=translate.require_model(body.model))
        return await _answer(request, gw, draft, streaming=bool(body.stream),
                             include_usage=_include_usage(body.stream_options),
                             id_prefix="chatcmpl", chunks=render.ChatChunks,
                             body=render.chat_completion)

    @post("/completions", status_code=200)
    async def completions(request: AnyRequest) -> Response[bytes] | Stream:
        body = translate.parse_completion_request(await json_body(request))
        draft = translate.completion_draft(body, model=translate.require_model(body.model))
        return await _answer(request, gw, draft, streaming=bool(body.stream),
                             include_usage=_include_usage(body.stream_options),
                             id_prefix="cmpl", chunks=render.TextChunks,
                             body=render.text_completion)

    return Router(path="/v1", route_handlers=[chat_completions, completions])
