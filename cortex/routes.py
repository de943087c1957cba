"""HTTP route handlers: fleet routes and the OpenAI chat endpoint.

A handler parses the body in its dialect, resolves the model, starts the job (`cortex.dispatch`)
and relays the stream. The 200 is committed only after a neuron accepted the job, so every refusal
still gets a real status; after that, failures become an error event inside the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.response import Stream

from bus_schema.messages import JobFailed, JobFinished, TokenChunk
from cortex import openai_dialect
from cortex.api import Health, ModelCard, ModelList, ModelLocation, NodeCounts
from cortex.bus import KEEPALIVE, BusError, GatewayBus, JobStream
from cortex.dispatch import start_job
from cortex.errors import ApiError, from_job_failure, model_not_found
from cortex.settings import GatewaySettings

log = logging.getLogger(__name__)

#: A stable ``created`` for every model card (REFERENCE §4: stable, not "now").
_CREATED: Final = 1735689600  # 2025-01-01T00:00:00Z
_CREATED_AT: Final = datetime.fromtimestamp(_CREATED, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
_JSON: Final = "application/json"
_SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_encoder: Final = msgspec.json.Encoder()

AnyRequest = Request[Any, Any, Any]


def _bus(state: State) -> GatewayBus:
    bus: GatewayBus = state.bus
    return bus


def _settings(state: State) -> GatewaySettings:
    settings: GatewaySettings = state.settings
    return settings


def _json(
    body: bytes, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(content=body, status_code=status, media_type=_JSON, headers=headers)


# ------------------------------------------------------------------ fleet routes


@get(["/health", "/"], sync_to_thread=False)
def health(state: State) -> Response[bytes]:
    healthy, total = _bus(state).fleet.health()
    return _json(_encoder.encode(
        Health(status="ok" if healthy else "degraded", nodes=NodeCounts(healthy, total))
    ))


def _card(bus: GatewayBus, model: str) -> ModelCard:
    locations = bus.fleet.locations(model)
    report = bus.fleet.model(model)
    return ModelCard(
        id=model,
        created=_CREATED,
        created_at=_CREATED_AT,
        owned_by="cortex",
        display_name=model,
        loaded=any(loc.status == "loaded" and loc.healthy for loc in locations),
        feasible_on=[],
        locations=[
            ModelLocation(
                node=loc.node,
                status=loc.status if loc.healthy else "unloaded",
                vram_estimate_mb=None,
            )
            for loc in locations
        ],
        max_model_len=report.context_length if report else None,
        load_progress=report.load_progress if report else None,
    )


@get("/v1/models", sync_to_thread=False)
def list_models(state: State) -> Response[bytes]:
    bus = _bus(state)
    cards = [_card(bus, model) for model in bus.fleet.model_ids()]
    return _json(_encoder.encode(ModelList(
        data=cards,
        has_more=False,
        first_id=cards[0].id if cards else None,
        last_id=cards[-1].id if cards else None,
    )))


@get("/v1/models/{model_id:path}", sync_to_thread=False)
def get_model(state: State, model_id: FromPath[str]) -> Response[bytes]:
    bus = _bus(state)
    model = model_id.lstrip("/")
    if model not in bus.fleet.model_ids():
        raise model_not_found(model)
    return _json(_encoder.encode(_card(bus, model)))


# ------------------------------------------------------------------ chat


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: AnyRequest, state: State) -> Response[bytes] | Stream:
    bus, settings = _bus(state), _settings(state)
    body = openai_dialect.parse_chat_request(await request.body())
    if not body.model:
        raise ApiError(400, "missing 'model' field in request body", param="model")
    job_id = uuid.uuid4().hex
    job = openai_dialect.to_job(body, model=body.model, job_id=job_id, settings=settings)
    stream, accepted = await start_job(bus, job)
    completion_id = f"chatcmpl-{job_id}"
    created = int(time.time())
    headers = {"x-request-id": job_id}
    if body.stream:
        writer = openai_dialect.ChunkWriter(
            completion_id=completion_id, created=created, model=job.model
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Stream(
            _sse(stream, writer, include_usage=include_usage, prompt_tokens=accepted.prompt_tokens),
            media_type="text/event-stream",
            headers={**_SSE_HEADERS, **headers},
        )
    text, finished = await _collect_or_cancel(request, stream)
    return _json(
        openai_dialect.completion(
            completion_id=completion_id,
            created=created,
            model=job.model,
            text=text,
            reason=finished.finish_reason,
            prompt_tokens=finished.usage.prompt_tokens,
            completion_tokens=finished.usage.completion_tokens,
        ),
        headers=headers,
    )


def _stream_error(exc: BusError) -> ApiError:
    return ApiError(502, f"the stream from the neuron broke: {exc}")


def _cancelled_error() -> ApiError:
    return ApiError(504, "generation was stopped on the neuron (deadline exceeded)",
                    code="timeout")


async def _collect(stream: JobStream) -> tuple[str, JobFinished]:
    """All text of a stream and its `JobFinished`.

    Raises:
        ApiError: the job failed, was cut, or the stream broke.
    """
    parts: list[str] = []
    try:
        async for event in stream.events():
            match event:
                case TokenChunk(text=text):
                    parts.append(text)
                case JobFinished(finish_reason="cancelled"):
                    raise _cancelled_error()
                case JobFinished():
                    return "".join(parts), event
                case JobFailed():
                    raise from_job_failure(event)
                case _:
                    pass  # keep-alives
    except BusError as exc:
        raise _stream_error(exc) from None
    raise _stream_error(BusError("stream ended without a terminal event"))


async def _collect_or_cancel(request: AnyRequest, stream: JobStream) -> tuple[str, JobFinished]:
    """`_collect`, but stop the job on the neuron if the client disconnects first."""
    collect = asyncio.ensure_future(_collect(stream))
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collect
            raise asyncio.CancelledError  # nobody is listening any more
        return collect.result()
    finally:
        disconnect.cancel()
        if not stream.finished:
            await stream.cancel()
        stream.close()


async def _wait_disconnect(request: AnyRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _sse(
    stream: JobStream,
    writer: openai_dialect.ChunkWriter,
    *,
    include_usage: bool,
    prompt_tokens: int,
) -> AsyncIterator[bytes]:
    """Relay job events as OpenAI SSE. Never raises (except the disconnect's CancelledError)."""
    try:
        yield writer.role()
        async for event in stream.events():
            if event is KEEPALIVE:
                yield writer.KEEPALIVE
                continue
            match event:
                case TokenChunk(text=text):
                    if text:
                        yield writer.content(text)
                case JobFinished(finish_reason="cancelled"):
                    yield writer.error(_cancelled_error())
                case JobFinished(usage=usage):
                    yield writer.finish(event.finish_reason)
                    if include_usage:
                        yield writer.usage(prompt_tokens, usage.completion_tokens)
                case JobFailed():
                    yield writer.error(from_job_failure(event))
                case _:
                    pass
        yield writer.DONE
    except BusError as exc:
        log.warning("job=%s stream broke: %s", stream.job.job_id, exc)
        yield writer.error(_stream_error(exc))
        yield writer.DONE
    finally:
        if not stream.finished:
            log.info("job=%s client went away; cancelling on %s", stream.job.job_id, stream.node)
            await stream.cancel()
        stream.close()
