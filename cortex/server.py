"""The gateway's HTTP server: the one place that builds its uvicorn `Config` (for ``cortex serve``,
``cortex up`` and the tests), with an HTTP/1.1 protocol that bounds the request head.

uvicorn's default parser (httptools) has no limit on the request line and headers: a 1 MB header
is buffered whole and served, and a 100 MB one is copied again on every read. uvicorn's h11
protocol has a limit but answers it with a plain-text 400 and closes while the client is still
sending, so the client usually sees a reset. `GatewayHttpProtocol` counts the bytes of each
request's head as they arrive; past `HEAD_LIMIT_BYTES` (one huge header or many small ones) it
answers 431 with an OpenAI-shaped JSON error (no route is known yet), half-closes, and discards
whatever the client still sends for up to `LINGER_S` so that the client reads the answer instead
of a reset.

Idle kept-alive connections are closed after `KEEP_ALIVE_S`, longer than the clients' own idle
expiry, so that the client is the one that closes them (see `KEEP_ALIVE_S`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Final, Literal

import uvicorn
from litestar import Litestar
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from cortex.dialects.openai.render import error_body
from cortex.errors import ApiError, Reason

log = logging.getLogger(__name__)

HEAD_LIMIT_BYTES: Final = 64 * 1024
"""Most bytes of a request line plus headers (nginx allows 32 KiB, Node.js 16 KiB)."""
LINGER_S: Final = 2.0
"""After a 431, how long the rest of the client's head is read and dropped before closing."""
KEEP_ALIVE_S: Final = 75
"""How long an idle kept-alive connection stays open (nginx's default). uvicorn's default, 5 s,
equals httpx's idle expiry (the OpenAI and Anthropic SDKs use httpx): the gateway then closed idle
connections at the moment clients reused them, and a request sent on a connection as it closed was
reset before it reached the gateway (1 to 2 requests in 2,000 of the soak test failed so)."""
#: uvicorn.run's exit status when the server could not start (port in use, lifespan failure).
STARTUP_FAILURE: Final = 3


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request's head (see the module doc)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True
        """Between requests, or inside a request line and headers."""
        self._head_bytes = 0
        self._refused = False
        self._linger: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        """Feed the parser at most what is left of the head's allowance at a time. Bodies go in
        slices of the same size: a pipelined request's head that begins inside a slice is counted
        from the next one, so it gets at most one more allowance."""
        if self._refused:
            return  # the rest of an oversize head: read and dropped
        while data:
            room = HEAD_LIMIT_BYTES - self._head_bytes if self._in_head else HEAD_LIMIT_BYTES
            if room <= 0:
                self._refuse()
                return
            piece, data = (data[:room], data[room:]) if len(data) > room else (data, b"")
            if self._in_head:
                self._head_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if (self._refused and self._linger is None and not self.pipeline
                and not self.transport.is_closing()):
            self._answer_431()  # after the pipelined requests that came before the oversize one

    def _refuse(self) -> None:
        self._refused = True
        log.info("431 to %s: request head over %d bytes", _peer(self.client), HEAD_LIMIT_BYTES)
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            return  # earlier requests on this connection are answered first
        self._answer_431()

    def _answer_431(self) -> None:
        """Answer 431, stop writing, and drop what the client still sends for `LINGER_S` (a close
        with unread bytes would make the kernel reset the connection under the answer)."""
        self._unset_keepalive_if_required()
        error = ApiError(Reason.HEADERS_TOO_LARGE,
                         f"the request line and headers exceed {HEAD_LIMIT_BYTES} bytes")
        body = error_body(error)
        head = [STATUS_LINE[error.spec.status]]
        for name, value in self.server_state.default_headers:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, self.transport.close)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"


def gateway_config(
    app: Litestar,
    *,
    host: str,
    port: int,
    log_level: str | None,
    log_config: dict[str, Any] | None = LOGGING_CONFIG,
    timeout_graceful_shutdown: int | None = None,
    lifespan: Literal["on", "off"] = "on",
) -> uvicorn.Config:
    """The uvicorn configuration every gateway runs with: `GatewayHttpProtocol` (the head limit)
    and `KEEP_ALIVE_S`."""
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, log_config=log_config,
        lifespan=lifespan, timeout_graceful_shutdown=timeout_graceful_shutdown,
        http=GatewayHttpProtocol, timeout_keep_alive=KEEP_ALIVE_S,
    )


def run(config: uvicorn.Config) -> None:
    """Serve until a signal, as `uvicorn.run` does (exit status 3 if the server never started)."""
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
