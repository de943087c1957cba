"""HTTP plumbing every dialect shares: JSON responses, event streams, disconnect detection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Final

from litestar import Request, Response

from cortex.relay import Batch, Outcome

AnyRequest = Request[Any, Any, Any]
JSON: Final = "application/json"
SSE: Final = "text/event-stream"
#: REFERENCE §7.3: no caching, no proxy buffering of event streams.
SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
