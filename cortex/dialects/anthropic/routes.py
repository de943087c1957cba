"""Anthropic routes: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Query strings (``?beta=true``) and ``anthropic-beta`` are ignored; ``x-api-key`` and
``Authorization: Bearer`` are both accepted; every response carries a ``request-id`` header.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import msgspec
from litestar import Response, Router, post
from litestar.response import Stream

from bus_schema.messages import JobAccepted
from cortex.answer import Rendering, answer
from cortex.auth import require_model
from cortex.bus import JobStream
from cortex.context import Gateway
from cortex.dialects.anthropic import render
from cortex.dialects.anthropic.shapes import TokenCount
from cortex.dialects.anthropic.translate import parse, translate
from cortex.dispatch import stamp
from cortex.errors import ApiError, bad_request
from cortex.http import (
    AnyRequest,
    json_body,
    json_response,
    write_batches,
)
from cortex.relay import Completion, relay

_encoder: Final = msgspec.json.Encoder()


def _model(model: str | None) -> str:
    if not model:
        raise bad_request("model: Field required", param="model")
    return model


def error_response(error: ApiError) -> Response[bytes]:
    """An error before the response started, in Anthropic's shape and status."""
    req_id = render.request_id()
    return json_response(render.error_body(error, req_id), status=error.spec.status_for_anthropic,
                         headers={**error.headers(), "request-id": req_id})


def router(gw: Gateway) -> Router:
    """The Anthropic routes, working with ``gw``."""

    @post("/messages", status_code=200)
    async def messages(request: AnyRequest) -> Response[bytes] | Stream:
        body = parse(await json_body(request))
        model = _model(body.model)
        translated = translate(body, model=model,
                               version=request.headers.get("anthropic-version"))
        job = stamp(translated.draft, gw.settings)
        msg_id = render.message_id()

        def events_for(stream: JobStream, accepted: JobAccepted) -> AsyncIterator[bytes]:
            events = render.MessageEvents(msg_id=msg_id, model=model,
                                          input_tokens=accepted.prompt_tokens,
                                          thinking=translated.thinking)
            return write_batches(relay(stream, accepted), events.render, opening=events.start())

        def one_body(done: Completion) -> bytes:
            return render.message(done, msg_id=msg_id, model=model, thinking=translated.thinking)

        return await answer(
            request, gw, job, streaming=bool(body.stream),
            headers={"request-id": render.request_id(), "x-request-id": job.job_id},
            rendering=Rendering(begin=events_for, keepalive=render.MessageEvents.ping(),
                                failed=render.MessageEvents.error, body=one_body))

    @post("/messages/count_tokens", status_code=200)
    async def count_tokens(request: AnyRequest) -> Response[bytes]:
        body = parse(await json_body(request))
        model = _model(body.model)
        require_model(request, gw.settings.catalogue.resolve(model))
        translated = translate(body, model=model, version=request.headers.get("anthropic-version"),
                               count_only=True)
        count = await gw.tokens.count(translated.draft)
        return json_response(_encoder.encode(TokenCount(input_tokens=count)),
                             headers={"request-id": render.request_id()})

    return Router(path="/v1", route_handlers=[messages, count_tokens])
