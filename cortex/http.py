"""HTTP plumbing every dialect shares: JSON responses, SSE headers, disconnect detection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from litestar import Request, Response

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
