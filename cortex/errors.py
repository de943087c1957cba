"""Every failure the gateway reports: one reason enum and one table from reason to how it surfaces.

A failure is an `ApiError` carrying a `Reason`. `REASONS` maps each reason to its HTTP status,
``retry-after``, OpenAI ``type``/``code`` and Anthropic ``error.type`` (and the status Anthropic
clients get where it differs: 529 ``overloaded_error`` for capacity problems). Nothing else in the
gateway picks a status: routes raise `ApiError(Reason…)`, `from_job_failure` turns a bus `JobFailed`
into one, and the dialects (`cortex.dialects`) only render it.

The reasons are the bus `ErrorCode`s (same values) plus the gateway's own.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from bus_schema.errors import ErrorCode
from bus_schema.messages import JobFailed


class Reason(enum.StrEnum):
    """Why a request failed. The first block mirrors `ErrorCode` value for value."""

    # reported by neurons (bus_schema.errors.ErrorCode)
    INVALID_REQUEST = "invalid_request"
    PROMPT_TOO_LONG = "prompt_too_long"
    MODEL_NOT_LOADED = "model_not_loaded"
    OVERLOADED = "overloaded"
    INSUFFICIENT_MEMORY = "insufficient_vram"
    TEMPLATE_ERROR = "template_error"
    ENGINE_ERROR = "engine_error"
    LOAD_FAILED = "load_failed"
    UNSUPPORTED_ARCHITECTURE = "unsupported_architecture"
    NOT_FOUND = "not_found"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    SHUTTING_DOWN = "shutting_down"
    PREFLIGHT_FAILED = "preflight_failed"
    """A load refused before download; the preflight kind is the error's ``code``."""
    PINNED = "pinned"
    # the gateway's own
    MODEL_NOT_FOUND = "model_not_found"
    """No node holds the model and the catalogue does not know it."""
    NO_WORKER = "no_worker"
    """The model is known but no healthy node serves it right now."""
    MODEL_LOADING = "model_loading"
    BUS_DOWN = "bus_down"
    ACCEPT_TIMEOUT = "accept_timeout"
    """No neuron accepted the job in time."""
    STREAM_BROKEN = "stream_broken"
    """The stream from the neuron broke (gap, silence, its node vanished)."""
    BAD_REPLY = "bad_reply"
    """A neuron answered something that is not the protocol."""
    CANCELLED = "cancelled"
    """The job was cancelled on the neuron by someone other than this client."""
    TOO_LARGE = "too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    """The request line and headers exceed the gateway's limit (`cortex.server`)."""
    UNSUPPORTED = "unsupported"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    """A body that is not ``application/json``."""
    """A valid request for something this gateway does not do."""
    ROUTE_NOT_FOUND = "route_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNAUTHORIZED = "unauthorized"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    """The request's API key may not use the model it names (`cortex.auth`)."""
    KEY_LIMIT = "key_limit"
    """The request's API key already has its ``max_concurrent`` requests in flight."""
    INTERNAL = "internal"


@dataclass(frozen=True)
class ErrorSpec:
    """How one reason surfaces over HTTP, in each dialect."""

    status: int
    openai_type: str
    openai_code: str | None
    anthropic_type: str
    retry_after: int | None = None
    """Seconds, sent as ``retry-after`` (429 and 503 class answers)."""
    anthropic_status: int | None = None
    """Where Anthropic clients get another status (529 ``overloaded_error``)."""
    permanent: bool = False
    """A 5xx that retrying will not fix: ``x-should-retry: false``."""

    @property
    def status_for_anthropic(self) -> int:
        return self.anthropic_status or self.status


_INVALID: Final = "invalid_request_error"


def _capacity(status: int, openai_type: str, code: str, retry_after: int) -> ErrorSpec:
    """Out of capacity for now: OpenAI clients get ``status``, Anthropic clients 529."""
    return ErrorSpec(status, openai_type, code, "overloaded_error", retry_after=retry_after,
                     anthropic_status=529)


REASONS: Final[Mapping[Reason, ErrorSpec]] = {
    Reason.INVALID_REQUEST: ErrorSpec(400, _INVALID, None, _INVALID),
    Reason.PROMPT_TOO_LONG: ErrorSpec(400, _INVALID, "context_length_exceeded", _INVALID),
    Reason.TEMPLATE_ERROR: ErrorSpec(400, _INVALID, "invalid_messages", _INVALID),
    Reason.UNSUPPORTED: ErrorSpec(400, _INVALID, "unsupported_parameter", _INVALID),
    Reason.UNSUPPORTED_ARCHITECTURE: ErrorSpec(422, _INVALID, "unsupported_architecture",
                                               _INVALID),
    Reason.PREFLIGHT_FAILED: ErrorSpec(422, _INVALID, "preflight_failed", _INVALID),
    Reason.PINNED: ErrorSpec(409, _INVALID, "pinned", _INVALID),
    Reason.UNAUTHORIZED: ErrorSpec(401, "authentication_error", "invalid_api_key",
                                   "authentication_error"),
    Reason.MODEL_NOT_ALLOWED: ErrorSpec(403, "permission_error", "model_not_allowed",
                                        "permission_error"),
    Reason.KEY_LIMIT: ErrorSpec(429, "rate_limit_error", "rate_limit_exceeded",
                                "rate_limit_error", retry_after=1),
    Reason.MODEL_NOT_FOUND: ErrorSpec(404, _INVALID, "model_not_found", "not_found_error"),
    Reason.NOT_FOUND: ErrorSpec(404, _INVALID, "not_found", "not_found_error"),
    Reason.ROUTE_NOT_FOUND: ErrorSpec(404, _INVALID, "not_found", "not_found_error"),
    Reason.METHOD_NOT_ALLOWED: ErrorSpec(405, _INVALID, "method_not_allowed", _INVALID),
    Reason.TOO_LARGE: ErrorSpec(413, _INVALID, "request_too_large", "request_too_large"),
    Reason.HEADERS_TOO_LARGE: ErrorSpec(431, _INVALID, "request_header_fields_too_large",
                                        "request_too_large"),
    Reason.UNSUPPORTED_MEDIA_TYPE: ErrorSpec(415, _INVALID, "unsupported_media_type", _INVALID),
    Reason.OVERLOADED: _capacity(429, "rate_limit_error", "rate_limit_exceeded", 1),
    Reason.MODEL_NOT_LOADED: _capacity(503, "server_error", "model_not_loaded", 1),
    Reason.NO_WORKER: _capacity(503, "server_error", "no_worker", 5),
    Reason.MODEL_LOADING: _capacity(503, "server_error", "model_loading", 5),
    Reason.INSUFFICIENT_MEMORY: _capacity(503, "server_error", "insufficient_vram", 5),
    Reason.SHUTTING_DOWN: ErrorSpec(503, "server_error", "shutting_down", "overloaded_error",
                                    retry_after=1),
    Reason.BUS_DOWN: ErrorSpec(503, "server_error", "bus_unavailable", "overloaded_error",
                               retry_after=2),
    Reason.CANCELLED: ErrorSpec(503, "server_error", "cancelled", "overloaded_error",
                                retry_after=1),
    Reason.ENGINE_ERROR: ErrorSpec(502, "server_error", "engine_error", "api_error"),
    Reason.LOAD_FAILED: ErrorSpec(502, "server_error", "load_failed", "api_error",
                                  permanent=True),
    Reason.STREAM_BROKEN: ErrorSpec(502, "server_error", "stream_broken", "api_error"),
    Reason.BAD_REPLY: ErrorSpec(502, "server_error", "bad_reply", "api_error"),
    Reason.DEADLINE_EXCEEDED: ErrorSpec(504, "server_error", "timeout", "timeout_error",
                                        permanent=True),
    Reason.ACCEPT_TIMEOUT: ErrorSpec(504, "server_error", "timeout", "timeout_error"),
    Reason.INTERNAL: ErrorSpec(500, "server_error", "internal_error", "api_error"),
}


class ApiError(Exception):
    """A failure answered to an HTTP client, before the response starts or inside its stream."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        param: str | None = None,
        prompt_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """``code`` replaces the table's OpenAI ``code`` (a preflight failure's kind);
        ``retry_after`` the table's ``retry-after`` (when the wait is known)."""
        super().__init__(message)
        self.reason = reason
        self.spec = REASONS[reason]
        self.code = code or self.spec.openai_code
        self.retry_after = retry_after if retry_after is not None else self.spec.retry_after
        self.message = message
        self.param = param
        self.prompt_tokens = prompt_tokens
        """For `Reason.PROMPT_TOO_LONG`: dialects word the message from these two."""
        self.max_prompt_tokens = max_prompt_tokens

    def __repr__(self) -> str:
        return f"ApiError({self.reason.value!r}, {self.message!r})"

    def headers(self) -> dict[str, str]:
        """``retry-after`` where the table gives one; ``x-should-retry: false`` on permanent 5xx."""
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers["retry-after"] = str(self.retry_after)
        if self.spec.permanent:
            headers["x-should-retry"] = "false"
        return headers


def bad_request(message: str, *, param: str | None = None) -> ApiError:
    return ApiError(Reason.INVALID_REQUEST, message, param=param)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        Reason.MODEL_NOT_FOUND,
        f"model '{model}' not found on any node and not in catalogue",
        param="model",
    )


def from_job_failure(failure: JobFailed) -> ApiError:
    """The error for a job the neuron refused or failed."""
    reason = Reason(failure.code.value)
    if failure.code is ErrorCode.PROMPT_TOO_LONG:
        return ApiError(reason, failure.message, param="messages",
                        prompt_tokens=failure.prompt_tokens,
                        max_prompt_tokens=failure.max_prompt_tokens)
    return ApiError(reason, failure.message)


_FIELD_RE: Final = re.compile(r"at `\$\.?(.*)`$")


def field_path(exc: msgspec.ValidationError) -> str | None:
    """The offending field of a msgspec validation error (``messages[0].role``), if it names one."""
    match = _FIELD_RE.search(str(exc))
    return match.group(1) or None if match else None
