"""OpenAI routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

Each handler parses its body, translates it into a `JobDraft`, and hands over to dispatch; the 200
is committed only after a neuron accepted the job, so every refusal keeps its real status. After
that, failures become an error event inside the stream.
"""

from __future__ import annotations

import time
from typing import Final

from litestar import Response, Router, post
from litestar.response import Stream

from cortex.deps import Bus, Settings
from cortex.dialects.openai import render, translate
from cortex.dispatch import stamp, start_job
from cortex.errors import ApiError
from cortex.http import SSE, SSE_HEADERS, AnyRequest, disconnect_waiter, json_response
from cortex.relay import collect, relay


@post("/chat/completions", status_code=200)
async def chat_completions(
    request: AnyRequest, bus: Bus, settings: Settings
) -> Response[bytes] | Stream:
    body = translate.parse_chat_request(await request.body())
    model = translate.require_model(body.model)
    job = stamp(translate.chat_draft(body, model=model), settings)
    stream, accepted = await start_job(bus, job)
    completion_id, created = f"chatcmpl-{job.job_id}", int(time.time())
    headers = {"x-request-id": job.job_id}
    if body.stream:
        chunks = render.ChatChunks(completion_id=completion_id, created=created, model=model)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Stream(render.chat_sse(relay(stream, accepted), chunks,
                                      include_usage=include_usage),
                      media_type=SSE, headers={**SSE_HEADERS, **headers})
    done = await collect(stream, accepted, disconnect_waiter(request))
    return json_response(
        render.chat_completion(done, completion_id=completion_id,
                               created=created, model=model),
        headers=headers,
    )


@post("/completions", status_code=200)
async def completions(
    request: AnyRequest, bus: Bus, settings: Settings
) -> Response[bytes] | Stream:
    body = translate.parse_completion_request(await request.body())
    model = translate.require_model(body.model)
    job = stamp(translate.completion_draft(body, model=model), settings)
    stream, accepted = await start_job(bus, job)
    completion_id, created = f"cmpl-{job.job_id}", int(time.time())
    headers = {"x-request-id": job.job_id}
    if body.stream:
        chunks = render.TextChunks(completion_id=completion_id, created=created, model=model)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Stream(render.text_sse(relay(stream, accepted), chunks,
                                      include_usage=include_usage),
                      media_type=SSE, headers={**SSE_HEADERS, **headers})
    done = await collect(stream, accepted, disconnect_waiter(request))
    return json_response(
        render.text_completion(done, completion_id=completion_id,
                               created=created, model=model),
        headers=headers,
    )


def error_response(error: ApiError) -> Response[bytes]:
    """An error before the response started, in OpenAI's shape."""
    return json_response(render.error_body(error), status=error.spec.status,
                         headers=error.headers())


router: Final = Router(path="/v1", route_handlers=[chat_completions, completions])
