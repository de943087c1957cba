"""The Litestar application: the fleet routes and each dialect's router behind API-key
authentication (`cortex.auth`), one error handler that answers every failure in the caller's
dialect, and a lifespan that starts and stops the bus."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

from litestar import Litestar, Response
from litestar.exceptions import HTTPException

from cortex import admin, routes
from cortex.auth import AuthMiddleware, KeyRing
from cortex.bus import GatewayBus
from cortex.context import Gateway
from cortex.dialects.anthropic import routes as anthropic
from cortex.dialects.openai import routes as openai
from cortex.errors import ApiError, Reason
from cortex.http import AnyRequest
from cortex.manager import FleetManager
from cortex.settings import GatewaySettings
from cortex.tokens import TokenCounter

log = logging.getLogger(__name__)

ErrorRenderer = Callable[[ApiError], Response[bytes]]

#: Which dialect answers errors on which paths; the first matching prefix wins.
_DIALECT_ERRORS: Final[tuple[tuple[str, ErrorRenderer], ...]] = (
    ("/v1/messages", anthropic.error_response),
    ("", openai.error_response),
)

_HTTP_REASONS: Final = {
    401: Reason.UNAUTHORIZED,
    404: Reason.ROUTE_NOT_FOUND,
    405: Reason.METHOD_NOT_ALLOWED,
    413: Reason.TOO_LARGE,
}


def _respond(request: AnyRequest, error: ApiError) -> Response[bytes]:
    path = request.url.path
    render = next(r for prefix, r in _DIALECT_ERRORS if path.startswith(prefix))
    return render(error)


def _on_api_error(request: AnyRequest, exc: ApiError) -> Response[bytes]:
    return _respond(request, exc)


def _on_http_exception(request: AnyRequest, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    reason = _HTTP_REASONS.get(status, Reason.INVALID_REQUEST if status < 500 else Reason.INTERNAL)
    if status == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    elif status == 413:
        message = "request body is too large for this gateway"
    else:
        message = exc.detail or "request failed"
    return _respond(request, ApiError(reason, message))


def _on_unexpected(request: AnyRequest, exc: Exception) -> Response[bytes]:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(request, ApiError(Reason.INTERNAL,
                                      "internal gateway error; see the gateway log"))


def create_app(settings: GatewaySettings, *, bus: GatewayBus) -> Litestar:
    """Build the gateway app around ``bus``; the app's lifespan starts and closes it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await bus.start()
        try:
            yield
        finally:
            await bus.close()

    gw = Gateway(bus=bus, settings=settings, tokens=TokenCounter(bus),
                 fleet=FleetManager(bus, settings))
    return Litestar(
        route_handlers=[*routes.handlers(gw), *admin.handlers(gw), openai.router(gw),
                        anthropic.router(gw)],
        lifespan=[lifespan],
        # no keys, no middleware: nothing to check, nothing added to each request
        middleware=[AuthMiddleware(KeyRing(settings.api_keys))] if settings.api_keys else [],
        exception_handlers={
            ApiError: _on_api_error,
            HTTPException: _on_http_exception,
            Exception: _on_unexpected,
        },
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        logging_config=None,  # only the CLI configures logging
        debug=False,
    )
