"""OpenAI's HTTP shapes: requests in, responses and stream chunks out.

Unknown request fields are ignored (clients add fields all the time); the types of known fields are
checked strictly. ``model`` and the input are optional here only so that their absence gets the
reference's own error text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

TemplateValue = str | int | float | bool | None
#: A 64-bit seed, as OpenAI documents it; anything else is a 400, not an engine failure.
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]

# ------------------------------------------------------------------ requests


class ImageUrl(msgspec.Struct, frozen=True):
    url: str


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None


class FunctionCallIn(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCallIn(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    function: FunctionCallIn
    type: str = "function"


class ChatMessageIn(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolIn(msgspec.Struct, frozen=True, kw_only=True):
    type: str = "function"
    function: FunctionDefinition | None = None


#: ``"none"``, ``"auto"``, ``"required"`` or an object naming tools (whose shape OpenAI keeps
#: extending): only ``"none"`` changes what the model sees.
ToolChoice = str | dict[str, Any]


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, frozen=True, kw_only=True):
    """Fields chat and legacy completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    user: str | None = None


class ChatCompletionRequest(_SamplingFields, frozen=True, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] | None = None
    max_completion_tokens: int | None = None
    chat_template_kwargs: dict[str, TemplateValue] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_SamplingFields, frozen=True, kw_only=True):
    """``POST /v1/completions`` (legacy): raw prompt text, no chat template."""

    prompt: str | list[str] | None = None
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


# ------------------------------------------------------------------ responses


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str


class ToolCallOut(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    function: FunctionCallOut
    type: Literal["function"] = "function"


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True):
    content: str | None
    role: Literal["assistant"] = "assistant"
    refusal: None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class FunctionDelta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    index: int
    function: FunctionDelta
    id: str | None = None
    type: Literal["function"] | None = None


class ChoiceDelta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChunkChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class TextChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class TextCompletion(msgspec.Struct, frozen=True, kw_only=True):
    """A legacy completion, and each chunk of its stream (same object name, as OpenAI does)."""

    id: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None


# ------------------------------------------------------------------ errors


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail
