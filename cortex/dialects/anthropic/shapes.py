"""Anthropic Messages HTTP shapes (REFERENCE §8): requests in, messages and stream events out.

Unknown fields are ignored (``metadata``, ``context_management``, ``cache_control``…); unknown
content block types are accepted here and dropped in translation, never a 400.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# ------------------------------------------------------------------ requests


class ImageSource(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    type: str
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ContentBlockIn(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Any content block; which fields matter depends on ``type``. Encodes back (a non-text
    block inside a tool result) with only the fields it was sent with."""

    type: str
    text: str | None = None
    # tool_use
    id: str | None = None
    name: str | None = None
    input: Any = None
    # tool_result
    tool_use_id: str | None = None
    content: str | list[ContentBlockIn] | None = None
    is_error: bool | None = None
    # thinking
    thinking: str | None = None
    signature: str | None = None
    # image
    source: ImageSource | None = None


class MessageIn(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlockIn]


class FunctionDefinition(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolIn(msgspec.Struct, frozen=True, kw_only=True):
    """A client tool ``{name, description, input_schema}``, an OpenAI-shaped tool
    ``{"type": "function", "function": {...}}``, or a server tool (any other ``type``)."""

    name: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    function: FunctionDefinition | None = None


class ToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["auto", "any", "none", "tool"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    """``enabled``, ``adaptive`` or ``disabled`` (anything else is treated as disabled)."""
    budget_tokens: int | None = None


class MessagesRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /v1/messages``, and ``/v1/messages/count_tokens`` (which has no ``max_tokens``).
    ``model``, ``max_tokens`` and ``messages`` are optional here only so that their absence gets
    Anthropic's own error text."""

    model: str | None = None
    max_tokens: int | None = None
    messages: list[MessageIn] | None = None
    system: str | list[ContentBlockIn] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = False
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


# ------------------------------------------------------------------ responses


class UsageOut(msgspec.Struct, frozen=True, kw_only=True):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class TextBlock(msgspec.Struct, frozen=True, kw_only=True, tag="text", tag_field="type"):
    text: str


class ThinkingBlock(msgspec.Struct, frozen=True, kw_only=True, tag="thinking", tag_field="type"):
    thinking: str
    signature: str


class ToolUseBlock(msgspec.Struct, frozen=True, kw_only=True, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: Any


ContentBlockOut = TextBlock | ThinkingBlock | ToolUseBlock


class Message(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    model: str
    content: list[ContentBlockOut]
    stop_reason: str | None
    stop_sequence: str | None
    usage: UsageOut
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"


class TokenCount(msgspec.Struct, frozen=True):
    input_tokens: int


# ------------------------------------------------------------------ stream events


class MessageStart(msgspec.Struct, frozen=True, tag="message_start", tag_field="type"):
    message: Message


class Ping(msgspec.Struct, frozen=True, tag="ping", tag_field="type"):
    pass


class ContentBlockStart(msgspec.Struct, frozen=True, tag="content_block_start",
                        tag_field="type"):
    index: int
    content_block: ContentBlockOut


class TextDeltaOut(msgspec.Struct, frozen=True, tag="text_delta", tag_field="type"):
    text: str


class ThinkingDeltaOut(msgspec.Struct, frozen=True, tag="thinking_delta", tag_field="type"):
    thinking: str


class SignatureDeltaOut(msgspec.Struct, frozen=True, tag="signature_delta", tag_field="type"):
    signature: str


class InputJsonDelta(msgspec.Struct, frozen=True, tag="input_json_delta", tag_field="type"):
    partial_json: str


BlockDelta = TextDeltaOut | ThinkingDeltaOut | SignatureDeltaOut | InputJsonDelta


class ContentBlockDelta(msgspec.Struct, frozen=True, tag="content_block_delta",
                        tag_field="type"):
    index: int
    delta: BlockDelta


class ContentBlockStop(msgspec.Struct, frozen=True, tag="content_block_stop", tag_field="type"):
    index: int


class StopDelta(msgspec.Struct, frozen=True):
    stop_reason: str
    stop_sequence: str | None


class DeltaUsage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int


class MessageDelta(msgspec.Struct, frozen=True, tag="message_delta", tag_field="type"):
    delta: StopDelta
    usage: DeltaUsage


class MessageStop(msgspec.Struct, frozen=True, tag="message_stop", tag_field="type"):
    pass


class ErrorDetail(msgspec.Struct, frozen=True):
    type: str
    message: str


class ErrorEvent(msgspec.Struct, frozen=True, tag="error", tag_field="type", omit_defaults=True):
    """The error body (with ``request_id``) and the mid-stream ``error`` event (without)."""

    error: ErrorDetail
    request_id: str | None = None


StreamEvent = (
    MessageStart | Ping | ContentBlockStart | ContentBlockDelta | ContentBlockStop
    | MessageDelta | MessageStop | ErrorEvent
)
