"""Relay outcomes in Anthropic's shapes: the ``message`` body (§8.3), the exact stream event
sequence (§8.5, every event with its ``event:`` line) and the error body (§8.6)."""

from __future__ import annotations

import json
import secrets
from typing import Any, Final, Literal, assert_never

import msgspec

from cortex.dialects.anthropic.shapes import (
    BlockDelta,
    ContentBlockDelta,
    ContentBlockOut,
    ContentBlockStart,
    ContentBlockStop,
    DeltaUsage,
    ErrorDetail,
    ErrorEvent,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessageStart,
    MessageStop,
    Ping,
    SignatureDeltaOut,
    StopDelta,
    StreamEvent,
    TextBlock,
    TextDeltaOut,
    ThinkingBlock,
    ThinkingDeltaOut,
    ToolUseBlock,
    UsageOut,
)
from cortex.errors import ApiError, Reason
from cortex.relay import (
    Completion,
    Failed,
    Finished,
    KeepAlive,
    Outcome,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)

_encoder: Final = msgspec.json.Encoder()
#: We cannot sign thinking the way Anthropic does; clients only need the field present.
SIGNATURE: Final = ""


def request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def error_message(error: ApiError) -> str:
    if error.reason is Reason.PROMPT_TOO_LONG and error.prompt_tokens is not None:
        # Claude Code matches this exact text to start compacting the conversation.
        return (f"prompt is too long: {error.prompt_tokens} tokens > "
                f"{error.max_prompt_tokens} maximum")
    return error.message


def error_body(error: ApiError, req_id: str) -> bytes:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    detail = ErrorDetail(type=error.spec.anthropic_type, message=error_message(error))
    return _encoder.encode(ErrorEvent(error=detail, request_id=req_id))


def stop_reason(finished: Finished) -> str:
    """REFERENCE §8.4."""
    match finished.reason:
        case "stop":
            return "stop_sequence" if finished.stop_sequence is not None else "end_turn"
        case "length":
            return "max_tokens"
        case "tool_calls":
            return "tool_use"
        case _:
            assert_never(finished.reason)


def tool_input(arguments: str) -> Any:
    """A tool call's arguments as the ``input`` object (``{}`` when they are not an object)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def message(done: Completion, *, msg_id: str, model: str, thinking: bool) -> bytes:
    """A non-streaming ``message`` body."""
    content: list[ContentBlockOut] = []
    if thinking and done.reasoning:
        content.append(ThinkingBlock(thinking=done.reasoning, signature=SIGNATURE))
    if done.text:
        content.append(TextBlock(text=done.text))
    content.extend(ToolUseBlock(id=c.id, name=c.name, input=tool_input(c.arguments))
                   for c in done.tool_calls)
    finished = done.finished
    return _encoder.encode(Message(
        id=msg_id, model=model, content=content, stop_reason=stop_reason(finished),
        stop_sequence=finished.stop_sequence,
        usage=UsageOut(input_tokens=finished.prompt_tokens,
                       output_tokens=finished.completion_tokens),
    ))


def _event(event: StreamEvent) -> bytes:
    name = type(event).__struct_config__.tag
    return b"event: " + str(name).encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n"


BlockKind = Literal["text", "thinking", "tool_use"]


class MessageEvents:
    """One stream's events: blocks indexed 0..k, each started and stopped once, one open at a time.
    """

    def __init__(self, *, msg_id: str, model: str, input_tokens: int, thinking: bool) -> None:
        self._id = msg_id
        self._model = model
        self._input_tokens = input_tokens
        self._thinking = thinking
        self._index = -1
        self._open: BlockKind | None = None

    def start(self) -> bytes:
        """``message_start`` with the real input token count, then a ``ping``."""
        opening = Message(
            id=self._id, model=self._model, content=[], stop_reason=None, stop_sequence=None,
            usage=UsageOut(input_tokens=self._input_tokens, output_tokens=1),
        )
        return _event(MessageStart(message=opening)) + self.ping()

    @staticmethod
    def ping() -> bytes:
        return _event(Ping())

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":
            out = self._delta(SignatureDeltaOut(signature=SIGNATURE))
        self._open = None
        return out + _event(ContentBlockStop(index=self._index))

    def _begin(self, kind: BlockKind, block: ContentBlockOut) -> bytes:
        out = self._close()
        self._index += 1
        self._open = kind
        return out + _event(ContentBlockStart(index=self._index, content_block=block))

    def _delta(self, delta: BlockDelta) -> bytes:
        return _event(ContentBlockDelta(index=self._index, delta=delta))

    def text(self, text: str) -> bytes:
        out = b"" if self._open == "text" else self._begin("text", TextBlock(text=""))
        return out + self._delta(TextDeltaOut(text=text))

    def reasoning(self, text: str) -> bytes:
        """A ``thinking_delta``; nothing unless the client asked for thinking."""
        if not self._thinking:
            return b""
        out = b"" if self._open == "thinking" else self._begin(
            "thinking", ThinkingBlock(thinking="", signature=""))
        return out + self._delta(ThinkingDeltaOut(thinking=text))

    def tool_use(self, call: ToolCallDelta) -> bytes:
        out = self._begin("tool_use", ToolUseBlock(id=call.id, name=call.name, input={}))
        out += self._delta(InputJsonDelta(partial_json=call.arguments))
        return out + self._close()

    def finish(self, finished: Finished) -> bytes:
        out = self._close()
        out += _event(MessageDelta(
            delta=StopDelta(stop_reason=stop_reason(finished),
                            stop_sequence=finished.stop_sequence),
            usage=DeltaUsage(input_tokens=self._input_tokens,
                             output_tokens=finished.completion_tokens),
        ))
        return out + _event(MessageStop())

    def render(self, outcome: Outcome) -> bytes:
        match outcome:
            case TextDelta(text=text):
                return self.text(text)
            case ReasoningDelta(text=text):
                return self.reasoning(text)
            case ToolCallDelta():
                return self.tool_use(outcome)
            case KeepAlive():
                return self.ping()
            case Finished():
                return self.finish(outcome)
            case Failed(error=error):
                return self.error(error)
            case _:
                assert_never(outcome)

    @staticmethod
    def error(error: ApiError) -> bytes:
        """``event: error``; the stream then ends without ``message_stop`` (§8.6)."""
        detail = ErrorDetail(type=error.spec.anthropic_type, message=error_message(error))
        return _event(ErrorEvent(error=detail))
