"""An OpenAI-compatible upstream that answers instantly, for measuring what a proxy adds.

A raw ASGI app on uvicorn: ``POST /v1/chat/completions`` streams ``max_tokens`` (capped by
``--tokens``) ``chat.completion.chunk`` events of one short word each, at once, then a finish
chunk, a usage chunk when ``stream_options.include_usage`` is set, and ``[DONE]``; without
``stream`` it answers one ``chat.completion``. ``GET /v1/models`` lists the one model.

Run:  .venv/bin/python -m bench.instant_upstream --port 8000 [--tokens 4096]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import msgspec
import uvicorn

WORD: Final = " tok"
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_encode = msgspec.json.Encoder().encode


class ChatBody(msgspec.Struct):
    model: str = "instant"
    stream: bool = False
    max_tokens: int | None = None
    stream_options: dict[str, bool] | None = None


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class InstantUpstream:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if scope["method"] == "GET" and path.endswith("/models"):
            models = {"object": "list", "data": [{"id": "instant", "object": "model",
                                                  "created": 0, "owned_by": "bench"}]}
            await _respond(send, 200, _encode(models), b"application/json")
            return
        if scope["method"] != "POST" or not path.endswith("/chat/completions"):
            await _respond(send, 404, b'{"error":{"message":"not found"}}', b"application/json")
            return
        try:
            body = msgspec.json.decode(await _read_body(receive), type=ChatBody)
        except msgspec.DecodeError as exc:
            await _respond(send, 400, _encode({"error": {"message": str(exc)}}),
                           b"application/json")
            return
        count = min(body.max_tokens or self.tokens, self.tokens)
        if body.stream:
            await self._stream(send, body, count)
        else:
            await _respond(send, 200, _encode(self._completion(body, count)),
                           b"application/json")

    def _completion(self, body: ChatBody, count: int) -> dict[str, object]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": body.model,
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": WORD * count}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": count,
                      "total_tokens": 1 + count},
        }

    async def _stream(self, send: Send, body: ChatBody, count: int) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"),
                                (b"cache-control", b"no-cache")]})
        base: dict[str, object] = {"id": f"chatcmpl-{uuid.uuid4().hex}",
                                   "object": "chat.completion.chunk",
                                   "created": int(time.time()), "model": body.model}

        async def event(choices: list[object], **extra: object) -> None:
            data = _encode({**base, "choices": choices, **extra})
            await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n",
                        "more_body": True})

        for i in range(count):
            delta: dict[str, str] = {"content": WORD}
            if i == 0:
                delta["role"] = "assistant"
            await event([{"index": 0, "delta": delta, "finish_reason": None}])
        await event([{"index": 0, "delta": {}, "finish_reason": "length"}])
        if body.stream_options and body.stream_options.get("include_usage"):
            await event([], usage={"prompt_tokens": 1, "completion_tokens": count,
                                   "total_tokens": 1 + count})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    uvicorn.run(InstantUpstream(args.tokens), host=args.host, port=args.port,
                log_level="warning", access_log=False, lifespan="on", backlog=4096)


if __name__ == "__main__":
    main()
