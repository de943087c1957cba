"""Relay outcomes in OpenAI's shapes: ``chat.completion`` and ``text_completion`` bodies, their SSE
chunks (``data: <json>\\n\\n``, LF endings, no ``event:`` lines, REFERENCE §7.3) and the error body.
"""

from __future__ import annotations

import abc
from typing import Final, assert_never

import msgspec

from cortex.dialects.openai.shapes import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    ErrorBody,
    ErrorDetail,
    FunctionCallOut,
    FunctionDelta,
    TextChoice,
    TextCompletion,
    ToolCallDeltaOut,
    ToolCallOut,
    Usage,
)
from cortex.errors import ApiError, Reason
from cortex.relay import (
    Completion,
    Delta,
    Failed,
    Finished,
    KeepAlive,
    Outcome,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)

_encoder: Final = msgspec.json.Encoder()
KEEPALIVE: Final = b": keepalive\n\n"
DONE: Final = b"data: [DONE]\n\n"


def error_body(error: ApiError) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}``."""
    message = error.message
    if error.reason is Reason.PROMPT_TOO_LONG and error.prompt_tokens is not None:
        message = (
            f"This model's maximum context length is {error.max_prompt_tokens} tokens. "
            f"However, your messages resulted in {error.prompt_tokens} tokens. "
            "Please reduce the length of the messages."
        )
    spec = error.spec
    return _encoder.encode(
        ErrorBody(ErrorDetail(message, spec.openai_type, error.param, error.code))
    )


def _usage(finished: Finished) -> Usage:
    return Usage(prompt_tokens=finished.prompt_tokens,
                 completion_tokens=finished.completion_tokens,
                 total_tokens=finished.prompt_tokens + finished.completion_tokens)


def chat_completion(
    done: Completion, *, completion_id: str, created: int, model: str
) -> bytes:
    """A non-streaming ``chat.completion`` body (REFERENCE §7.2)."""
    calls = [
        ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in done.tool_calls
    ]
    message = AssistantMessage(
        content=done.text or (None if calls else ""),
        reasoning_content=done.reasoning or None,
        tool_calls=calls or None,
    )
    return _encoder.encode(ChatCompletion(
        id=completion_id, created=created, model=model,
        choices=[Choice(index=0, message=message, finish_reason=done.finished.reason)],
        usage=_usage(done.finished),
    ))


def text_completion(
    done: Completion, *, completion_id: str, created: int, model: str
) -> bytes:
    """A non-streaming legacy ``text_completion`` body."""
    return _encoder.encode(TextCompletion(
        id=completion_id, created=created, model=model,
        choices=[TextChoice(index=0, text=done.text, finish_reason=done.finished.reason)],
        usage=_usage(done.finished),
    ))


class _Chunks(abc.ABC):
    """One stream's SSE events (``data: <json>\n\n``): keep-alives, the end (finish chunk, the
    usage chunk only with ``stream_options.include_usage``, ``[DONE]``) and mid-stream errors are
    the same for every OpenAI stream; subclasses shape the chunks."""

    def __init__(self, *, completion_id: str, created: int, model: str,
                 include_usage: bool) -> None:
        self._id = completion_id
        self._created = created
        self._model = model
        self._include_usage = include_usage

    def opening(self) -> bytes:
        """What the stream starts with, sent together with the first outcomes."""
        return b""

    def render(self, outcome: Outcome) -> bytes:
        """The bytes one relay outcome becomes."""
        match outcome:
            case TextDelta() | ReasoningDelta() | ToolCallDelta():
                return self._delta_chunk(outcome)
            case KeepAlive():
                return KEEPALIVE
            case Finished():
                usage = self._usage_chunk(_usage(outcome)) if self._include_usage else b""
                return self._finish_chunk(outcome.reason) + usage + DONE
            case Failed(error=error):
                return stream_error(error)
            case _:
                assert_never(outcome)

    @abc.abstractmethod
    def _delta_chunk(self, delta: Delta) -> bytes: ...

    @abc.abstractmethod
    def _finish_chunk(self, reason: str) -> bytes: ...

    @abc.abstractmethod
    def _usage_chunk(self, usage: Usage) -> bytes:
        """The ``choices: []`` chunk that carries the usage."""


class ChatChunks(_Chunks):
    """Renders one chat stream's SSE events."""

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        body = _encoder.encode(ChatCompletionChunk(
            id=self._id, created=self._created, model=self._model, choices=choices, usage=usage
        ))
        return b"data: " + body + b"\n\n"

    def _choice(self, delta: ChoiceDelta) -> bytes:
        return self._chunk([ChunkChoice(index=0, delta=delta)])

    def opening(self) -> bytes:
        """The first chunk: the assistant role (the only delta that carries it)."""
        return self._choice(ChoiceDelta(role="assistant", content=""))

    def _delta_chunk(self, delta: Delta) -> bytes:
        match delta:
            case TextDelta(text=text):
                return self._choice(ChoiceDelta(content=text))
            case ReasoningDelta(text=text):
                return self._choice(ChoiceDelta(reasoning_content=text))
            case ToolCallDelta():
                # id, type and name once with empty arguments, then the arguments
                head = ToolCallDeltaOut(index=delta.index, id=delta.id, type="function",
                                        function=FunctionDelta(name=delta.name, arguments=""))
                body = ToolCallDeltaOut(index=delta.index,
                                        function=FunctionDelta(arguments=delta.arguments))
                return (self._choice(ChoiceDelta(tool_calls=[head]))
                        + self._choice(ChoiceDelta(tool_calls=[body])))
            case _:
                assert_never(delta)

    def _finish_chunk(self, reason: str) -> bytes:
        return self._chunk([ChunkChoice(index=0, delta=ChoiceDelta(), finish_reason=reason)])

    def _usage_chunk(self, usage: Usage) -> bytes:
        return self._chunk([], usage)


class TextChunks(_Chunks):
    """Renders one legacy completion stream's SSE events. Prompt jobs are not output-routed on
    the neuron, so reasoning and tool-call outcomes do not occur; were one to, its text would be
    passed through."""

    def _chunk(self, choices: list[TextChoice], usage: Usage | None = None) -> bytes:
        body = _encoder.encode(TextCompletion(
            id=self._id, created=self._created, model=self._model, choices=choices, usage=usage
        ))
        return b"data: " + body + b"\n\n"

    def _delta_chunk(self, delta: Delta) -> bytes:
        match delta:
            case TextDelta(text=text) | ReasoningDelta(text=text):
                return self._chunk([TextChoice(index=0, text=text)])
            case ToolCallDelta(arguments=arguments):
                return self._chunk([TextChoice(index=0, text=arguments)])
            case _:
                assert_never(delta)

    def _finish_chunk(self, reason: str) -> bytes:
        return self._chunk([TextChoice(index=0, text="", finish_reason=reason)])

    def _usage_chunk(self, usage: Usage) -> bytes:
        return self._chunk([], usage)


def error_event(error: ApiError) -> bytes:
    """A mid-stream error event (sent after the 200; followed by ``[DONE]``)."""
    return b"data: " + error_body(error) + b"\n\n"


def stream_error(error: ApiError) -> bytes:
    """How a stream that failed before its first chunk ends: the error event, then ``[DONE]``."""
    return error_event(error) + DONE
