"""Public HTTP shapes of the OpenAI dialect (requests in, responses out).

These are not bus types: `cortex.routes` converts a request into a `bus_schema` `JobRequest` in one
function. Unknown request fields are ignored (clients add fields all the time); the types of known
fields are checked strictly.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

TemplateValue = str | int | float | bool | None
#: A 64-bit seed, as OpenAI documents it; anything else is a 400, not an engine failure.
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class ImageUrl(msgspec.Struct, frozen=True):
    url: str


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None


class FunctionCallIn(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str = ""


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


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /v1/chat/completions``. ``model`` and ``messages`` are optional here only so that
    their absence gets the reference's own error text."""

    model: str | None = None
    messages: list[ChatMessageIn] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
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
    chat_template_kwargs: dict[str, TemplateValue] | None = None
    tools: list[msgspec.Raw] | None = None
    tool_choice: msgspec.Raw | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None


# ------------------------------------------------------------------ responses


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True):
    content: str | None
    role: Literal["assistant"] = "assistant"
    refusal: None = None
    tool_calls: None = None


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


class Delta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


# ------------------------------------------------------------------ fleet


class ModelLocation(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    status: str
    vram_estimate_mb: int | None = None


class ModelCard(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One entry of ``GET /v1/models``: readable by the OpenAI and Anthropic SDKs alike."""

    id: str
    created: int
    created_at: str
    owned_by: str
    display_name: str
    loaded: bool
    feasible_on: list[str]
    locations: list[ModelLocation]
    object: Literal["model"] = "model"
    type: Literal["model"] = "model"
    max_model_len: int | None = None
    load_progress: float | None = None


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[ModelCard]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"


class NodeCounts(msgspec.Struct, frozen=True):
    healthy: int
    total: int


class Health(msgspec.Struct, frozen=True):
    status: Literal["ok", "degraded"]
    nodes: NodeCounts
