"""The OpenAI dialect: request validation and conversion to a `JobRequest`, and rendering of job
events as ``chat.completion`` / SSE ``chat.completion.chunk`` (REFERENCE §7)."""

from __future__ import annotations

import re
import time
from typing import Final

import msgspec

from bus_schema.messages import ChatMessage, JobRequest, SamplingParams, ToolCall, ToolCallFunction
from cortex.api import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageIn,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from cortex.errors import ApiError, bad_request, openai_error_body
from cortex.settings import GatewaySettings

_decoder: Final = msgspec.json.Decoder(ChatCompletionRequest)
_encoder: Final = msgspec.json.Encoder()
_PATH_RE: Final = re.compile(r"at `\$\.?(.*)`$")
_MAX_STOP: Final = 16


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Decode and type-check a chat request body.

    Raises:
        ApiError: 400 with the offending field as ``param``.
    """
    if not body.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH_RE.search(text)
        raise bad_request(f"invalid request body: {text}",
                          param=match.group(1) if match else None) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None


def _flatten(message: ChatMessageIn, index: int) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    texts: list[str] = []
    for n, part in enumerate(content):
        if part.type == "text":
            if part.text is None:
                raise bad_request("text content part without 'text'",
                                  param=f"messages[{index}].content[{n}].text")
            texts.append(part.text)
        else:
            raise bad_request(
                f"content part type '{part.type}' is not supported by this gateway yet "
                "(text only)",
                param=f"messages[{index}].content[{n}].type",
                code="unsupported_content",
            )
    return "".join(texts)


def _check_range(value: float | None, name: str, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise bad_request(f"'{name}' must be between {lo:g} and {hi:g}, got {value:g}", param=name)


def to_job(
    request: ChatCompletionRequest, *, model: str, job_id: str, settings: GatewaySettings
) -> JobRequest:
    """Validate the request's semantics and build the bus job for ``model`` (already resolved).

    Raises:
        ApiError: 400 naming the offending parameter.
    """
    if not request.messages:
        raise bad_request("'messages' must be a non-empty array", param="messages")
    if request.n is not None and request.n != 1:
        raise bad_request("only n=1 is supported", param="n")
    if request.tools:
        raise bad_request("tool calling is not supported by this gateway yet", param="tools",
                          code="unsupported_parameter")
    _check_range(request.temperature, "temperature", 0.0, 2.0)
    _check_range(request.top_p, "top_p", 1e-9, 1.0)
    _check_range(request.presence_penalty, "presence_penalty", -2.0, 2.0)
    _check_range(request.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    if request.repetition_penalty is not None and request.repetition_penalty <= 0:
        raise bad_request("'repetition_penalty' must be positive", param="repetition_penalty")
    if request.top_k is not None and request.top_k < 0:
        raise bad_request("'top_k' must be >= 0 (0 disables it)", param="top_k")
    max_tokens = (
        request.max_completion_tokens
        if request.max_completion_tokens is not None
        else request.max_tokens
    )
    if max_tokens is not None and max_tokens < 1:
        name = (
            "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        )
        raise bad_request(f"'{name}' must be at least 1", param=name)
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > _MAX_STOP or any(not s for s in stop):
        raise bad_request(f"'stop' takes 1 to {_MAX_STOP} non-empty strings", param="stop")
    messages = tuple(
        ChatMessage(
            role="system" if m.role == "developer" else m.role,
            content=_flatten(m, i),
            name=m.name,
            tool_calls=tuple(
                ToolCall(id=c.id, function=ToolCallFunction(name=c.function.name,
                                                            arguments=c.function.arguments))
                for c in m.tool_calls or ()
            ),
            tool_call_id=m.tool_call_id,
            reasoning_content=m.reasoning_content,
        )
        for i, m in enumerate(request.messages)
    )
    return JobRequest(
        job_id=job_id,
        model=model,
        messages=messages,
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=(
                request.temperature
                if request.temperature is not None
                else settings.default_temperature
            ),
            top_p=request.top_p if request.top_p is not None else 1.0,
            top_k=request.top_k or 0,
            seed=request.seed,
            stop=stop,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
        ),
        chat_template_kwargs=dict(request.chat_template_kwargs or {}),
        deadline=time.time() + settings.job_deadline_s,
        gateway=settings.gateway_id,
    )


def completion(
    *, completion_id: str, created: int, model: str, text: str, reason: str,
    prompt_tokens: int, completion_tokens: int,
) -> bytes:
    """A non-streaming ``chat.completion`` body."""
    return _encoder.encode(
        ChatCompletion(
            id=completion_id,
            created=created,
            model=model,
            choices=[Choice(index=0, message=AssistantMessage(content=text),
                            finish_reason=reason)],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
        )
    )


class ChunkWriter:
    """Renders one stream's SSE events (``data: <json>\\n\\n``, LF endings, no ``event:`` lines)."""

    KEEPALIVE: Final = b": keepalive\n\n"
    DONE: Final = b"data: [DONE]\n\n"

    def __init__(self, *, completion_id: str, created: int, model: str) -> None:
        self._id = completion_id
        self._created = created
        self._model = model

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        body = _encoder.encode(
            ChatCompletionChunk(id=self._id, created=self._created, model=self._model,
                                choices=choices, usage=usage)
        )
        return b"data: " + body + b"\n\n"

    def role(self) -> bytes:
        """The first chunk: the assistant role (the only delta that carries it)."""
        return self._chunk([ChunkChoice(index=0, delta=Delta(role="assistant", content=""))])

    def content(self, text: str) -> bytes:
        return self._chunk([ChunkChoice(index=0, delta=Delta(content=text))])

    def finish(self, reason: str) -> bytes:
        return self._chunk([ChunkChoice(index=0, delta=Delta(),
                                        finish_reason=reason)])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The ``choices: []`` usage chunk (only with ``stream_options.include_usage``)."""
        return self._chunk([], Usage(prompt_tokens=prompt_tokens,
                                     completion_tokens=completion_tokens,
                                     total_tokens=prompt_tokens + completion_tokens))

    @staticmethod
    def error(error: ApiError) -> bytes:
        """A mid-stream error event (sent after the 200; followed by ``[DONE]``)."""
        return b"data: " + openai_error_body(error) + b"\n\n"
