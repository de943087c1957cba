"""HTTP plumbing every dialect shares: JSON responses, event streams, disconnect detection."""

from __future__ import annotations

import array
import contextlib
import itertools
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import msgspec
from litestar import Request, Response

from cortex.errors import ApiError, Reason, bad_request, field_path
from cortex.relay import Batch, Outcome

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

AnyRequest = Request[Any, Any, Any]
JSON: Final = "application/json"
SSE: Final = "text/event-stream"
MAX_JSON_DEPTH: Final = 128
"""Deepest nesting of arrays and objects a request body may have. Free-form fields (tool schemas,
tool arguments) would otherwise carry nesting that the decoder just accepts but that the bus
encoder, a few levels deeper and further down the stack, cannot write."""
_ESCAPE: Final = re.compile(rb"\\.", re.DOTALL)
_STRING: Final = re.compile(rb'"[^"]*"')
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN: Final = b"\x01"
_STEPS: Final = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")
"""Openers to +1, closers to -1 (as signed bytes)."""
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
    if nested_deeper_than(body, MAX_JSON_DEPTH):
        raise bad_request(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} "
                          "levels of arrays and objects)")
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


def nested_deeper_than(body: bytes, limit: int) -> bool:
    """Whether the JSON text ``body`` nests arrays and objects more than ``limit`` deep (brackets
    inside strings do not count; for malformed JSON, a guess the decoder then overrules). Runs in
    C but for a running sum over the brackets, and only for bodies with many of them."""
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", body)).translate(_STEPS, _NOT_BRACKETS)
    if len(brackets) <= 2 * limit:
        return False
    if _OPEN * (limit + 1) in brackets:
        return True
    return max(itertools.accumulate(array.array("b", brackets))) > limit


def within_bus_limits(value: S, *, param: str) -> S:
    """``value``, a bus Struct built from a request, checked against the limits the bus schema
    declares (lengths, ranges): constructors do not check them, and a neuron drops a job it cannot
    decode, so the client would wait for a timeout instead of getting a 400.

    Raises:
        ApiError: 400 naming the field inside ``param`` (``tools[0].name: Expected `str` of
            length <= 256``).
    """
    try:
        msgspec.convert(msgspec.to_builtins(value), type(value))
    except msgspec.ValidationError as exc:
        field = field_path(exc)
        where = f"{param}.{field}" if field else param
        reason = str(exc).rsplit(" - at `", 1)[0]  # the path inside the bus type: misleading
        raise bad_request(f"{where}: {reason}", param=where) from None
    return value


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
