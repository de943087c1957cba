"""HTTP plumbing every dialect shares: JSON responses, event streams, disconnect detection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import msgspec
from litestar import Request, Response

from cortex.errors import ApiError, Reason, bad_request, field_path
from cortex.relay import Batch, Outcome

T = TypeVar("T")

AnyRequest = Request[Any, Any, Any]
JSON: Final = "application/json"
SSE: Final = "text/event-stream"
#: REFERENCE §7.3: no caching, no proxy buffering of event streams.
SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def json_body(request: AnyRequest) -> bytes:
    """The body of a JSON request. Only ``application/json`` (any parameters, e.g. charset) is
    accepted: a browser page can send ``text/plain`` across sites without a preflight, so a body
    in any other type must not run a job.

    Raises:
        ApiError: 415 for another content type.
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != JSON:
        shown = media_type or "none"
        raise ApiError(Reason.UNSUPPORTED_MEDIA_TYPE,
                       f"request bodies must be application/json (got {shown}); send the "
                       "header Content-Type: application/json")
    return await request.body()


def decode_body(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode and type-check a JSON request body, for every dialect.

    Raises:
        ApiError: 400 with the offending field as ``param`` and first in the message
            (``max_tokens: Expected `int`, got `str` …``).
    """
    if not body.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        field = field_path(exc)
        raise bad_request(f"{field}: {exc}" if field else f"invalid request body: {exc}",
                          param=field) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply") from None


def json_response(
    body: bytes, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response[bytes]:
    return Response(content=body, status_code=status, media_type=JSON, headers=headers)


def disconnect_waiter(request: AnyRequest) -> Callable[[], Awaitable[None]]:
    """A coroutine function returning when the client disconnects (for `cortex.relay.collect`)."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


async def write_batches(
    batches: AsyncGenerator[Batch, None], render: Callable[[Outcome], bytes], *,
    opening: bytes = b"",
) -> AsyncIterator[bytes]:
    """A relay as an event stream: each batch of outcomes rendered by the dialect and written at
    once (``opening`` goes out with the first). Never raises, except a disconnect's
    `CancelledError` (an exception escaping a Litestar stream aborts the connection); closing it
    closes the relay, which cancels a job still running."""
    async with contextlib.aclosing(batches):
        pending = opening
        async for batch in batches:
            chunk = pending + b"".join(render(outcome) for outcome in batch)
            pending = b""
            if chunk:
                yield chunk
