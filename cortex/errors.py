"""The gateway's errors and the one table that maps them to HTTP statuses and dialect bodies.

Every failure the gateway reports is an `ApiError` (raised by routes, or built from a bus
`JobFailed` by `from_job_failure`). `cortex.app` renders it in the caller's dialect; today that is
OpenAI's ``{"error": {"message", "type", "param", "code"}}``; the Anthropic shape plugs into
`render_error` next to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from bus_schema.errors import ErrorCode
from bus_schema.messages import JobFailed


@dataclass(frozen=True)
class ErrorSpec:
    """How one bus error code surfaces over HTTP."""

    status: int
    openai_type: str
    openai_code: str | None = None
    retry_after: int | None = None


ERRORS: Final[Mapping[ErrorCode, ErrorSpec]] = {
    ErrorCode.INVALID_REQUEST: ErrorSpec(400, "invalid_request_error"),
    ErrorCode.PROMPT_TOO_LONG: ErrorSpec(400, "invalid_request_error", "context_length_exceeded"),
    ErrorCode.TEMPLATE_ERROR: ErrorSpec(400, "invalid_request_error", "invalid_messages"),
    ErrorCode.MODEL_NOT_LOADED: ErrorSpec(503, "server_error", "model_not_loaded", retry_after=1),
    ErrorCode.OVERLOADED: ErrorSpec(429, "rate_limit_error", "rate_limit_exceeded", retry_after=1),
    ErrorCode.INSUFFICIENT_MEMORY: ErrorSpec(503, "server_error", "insufficient_vram", 5),
    ErrorCode.ENGINE_ERROR: ErrorSpec(502, "server_error", "engine_error"),
    ErrorCode.LOAD_FAILED: ErrorSpec(502, "server_error", "load_failed"),
    ErrorCode.UNSUPPORTED_ARCHITECTURE: ErrorSpec(422, "invalid_request_error",
                                                  "unsupported_architecture"),
    ErrorCode.NOT_FOUND: ErrorSpec(404, "invalid_request_error", "model_not_found"),
    ErrorCode.DEADLINE_EXCEEDED: ErrorSpec(504, "server_error", "timeout"),
    ErrorCode.SHUTTING_DOWN: ErrorSpec(503, "server_error", "shutting_down", retry_after=1),
}


class ApiError(Exception):
    """An error answered to an HTTP client, before or during a response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.should_retry = should_retry

    def headers(self) -> dict[str, str]:
        """``retry-after`` on 429/503, ``x-should-retry: false`` on 5xx that will not go away."""
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers["retry-after"] = str(self.retry_after)
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "invalid_request_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"model '{model}' not found on any node and not in catalogue",
        code="model_not_found",
        param="model",
    )


def from_job_failure(failure: JobFailed) -> ApiError:
    """The HTTP error for a job the neuron refused or failed."""
    spec = ERRORS.get(failure.code, ErrorSpec(502, "server_error", failure.code.value))
    message = failure.message
    if failure.code is ErrorCode.PROMPT_TOO_LONG and failure.prompt_tokens is not None:
        message = (
            f"This model's maximum context length is {failure.max_prompt_tokens} tokens. "
            f"However, your messages resulted in {failure.prompt_tokens} tokens. "
            "Please reduce the length of the messages."
        )
    return ApiError(
        spec.status,
        message,
        type=spec.openai_type,
        code=spec.openai_code,
        param="messages" if failure.code is ErrorCode.PROMPT_TOO_LONG else None,
        retry_after=spec.retry_after,
        should_retry=None if failure.retryable or spec.status < 500 else False,
    )


class _OpenAIErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str | None


class _OpenAIError(msgspec.Struct, frozen=True):
    error: _OpenAIErrorDetail


_encoder: Final = msgspec.json.Encoder()


def openai_error_body(error: ApiError) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return _encoder.encode(
        _OpenAIError(_OpenAIErrorDetail(error.message, error.type, error.param, error.code))
    )


def render_error(error: ApiError, path: str) -> bytes:
    """The error body in the dialect of the route at ``path``."""
    del path  # one dialect today; /v1/messages will answer in Anthropic's shape
    return openai_error_body(error)
