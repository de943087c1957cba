"""The one error table: every bus error code and every gateway reason surfaces somewhere defined."""

from __future__ import annotations

import json

import pytest

from bus_schema.errors import ErrorCode
from bus_schema.messages import JobFailed
from cortex.dialects.anthropic import render as anthropic
from cortex.dialects.openai import render as openai
from cortex.errors import REASONS, ApiError, Reason, from_job_failure


def test_every_bus_error_code_is_a_reason_with_a_spec() -> None:
    for code in ErrorCode:
        assert Reason(code.value) in REASONS


def test_every_reason_has_a_spec_with_a_real_status() -> None:
    assert set(REASONS) == set(Reason)
    for reason, spec in REASONS.items():
        assert 400 <= spec.status < 600, reason
        if spec.status in (429, 503):
            assert spec.retry_after is not None, f"{reason} needs retry-after"


@pytest.mark.parametrize(
    ("reason", "openai_status", "anthropic_status", "anthropic_type"),
    [
        (Reason.INVALID_REQUEST, 400, 400, "invalid_request_error"),
        (Reason.UNAUTHORIZED, 401, 401, "authentication_error"),
        (Reason.MODEL_NOT_FOUND, 404, 404, "not_found_error"),
        (Reason.TOO_LARGE, 413, 413, "request_too_large"),
        (Reason.OVERLOADED, 429, 529, "overloaded_error"),
        (Reason.NO_WORKER, 503, 529, "overloaded_error"),
        (Reason.BUS_DOWN, 503, 503, "overloaded_error"),
        (Reason.ENGINE_ERROR, 502, 502, "api_error"),
        (Reason.INTERNAL, 500, 500, "api_error"),
        (Reason.DEADLINE_EXCEEDED, 504, 504, "timeout_error"),
    ],
)
def test_statuses_per_dialect(
    reason: Reason, openai_status: int, anthropic_status: int, anthropic_type: str
) -> None:
    error = ApiError(reason, "boom")
    assert error.spec.status == openai_status
    assert error.spec.status_for_anthropic == anthropic_status
    body = json.loads(anthropic.error_body(error, "req_1"))
    assert body == {"type": "error", "request_id": "req_1",
                    "error": {"type": anthropic_type, "message": "boom"}}


def test_prompt_too_long_is_worded_per_dialect() -> None:
    failure = JobFailed(job_id="j", seq=0, code=ErrorCode.PROMPT_TOO_LONG, message="too long",
                        prompt_tokens=70, max_prompt_tokens=63)
    error = from_job_failure(failure)
    assert error.spec.status == 400
    body = json.loads(openai.error_body(error))["error"]
    assert body["message"] == (
        "This model's maximum context length is 63 tokens. However, your messages resulted in "
        "70 tokens. Please reduce the length of the messages."
    )
    assert (body["code"], body["param"]) == ("context_length_exceeded", "messages")
    assert anthropic.error_message(error) == "prompt is too long: 70 tokens > 63 maximum"


def test_permanent_failures_say_do_not_retry() -> None:
    assert ApiError(Reason.LOAD_FAILED, "x").headers() == {"x-should-retry": "false"}
    assert ApiError(Reason.OVERLOADED, "x").headers() == {"retry-after": "1"}
    assert ApiError(Reason.ENGINE_ERROR, "x").headers() == {}
