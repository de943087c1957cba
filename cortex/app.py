"""The Litestar application: routes, one error handler for every failure, and a lifespan that owns
the bus connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException

from cortex import routes
from cortex.bus import GatewayBus
from cortex.errors import ApiError, render_error
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings

log = logging.getLogger(__name__)


def _error_response(request: Request[Any, Any, Any], error: ApiError) -> Response[bytes]:
    return Response(
        content=render_error(error, request.url.path),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers(),
    )


def _on_api_error(request: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
    return _error_response(request, exc)


def _on_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if status == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    elif status == 413:
        message = "request body is too large for this gateway"
    else:
        message = exc.detail or "request failed"
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    return _error_response(request, ApiError(status, message, code=code))


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(request, ApiError(500, "internal gateway error; see the gateway log"))


def create_app(settings: GatewaySettings, *, nats_url: str) -> Litestar:
    """Build the gateway app; its lifespan connects to NATS at ``nats_url``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        fleet = FleetView()
        bus = GatewayBus(settings, fleet)
        await bus.connect(nats_url)
        await asyncio.sleep(settings.discover_wait_s)  # let neurons answer discovery
        app.state.bus = bus
        app.state.settings = settings
        try:
            yield
        finally:
            await bus.close()

    return Litestar(
        route_handlers=[
            routes.health,
            routes.list_models,
            routes.get_model,
            routes.chat_completions,
        ],
        lifespan=[lifespan],
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
