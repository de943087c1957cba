"""Anthropic Messages → `JobDraft` (REFERENCE §8.2): one leading system message, content blocks to
chat messages (tool results before the rest of their message), tools and tool choice, thinking,
sampling under the request's ``anthropic-version``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from bus_schema.messages import ChatMessage, ToolCall, ToolCallFunction, ToolDefinition
from cortex.dialects.anthropic.shapes import ContentBlockIn, MessageIn, MessagesRequest, ToolIn
from cortex.dispatch import JobDraft, Sampling
from cortex.errors import ApiError, Reason, bad_request
from cortex.http import decode_body, within_bus_limits

_decoder: Final = msgspec.json.Decoder(MessagesRequest)
_json: Final = msgspec.json.Encoder()
_MAX_STOP: Final = 16
#: Under this version Anthropic's API refuses sampling parameters; we ignore them (§8.1).
_NO_SAMPLING_VERSION: Final = "2026-10-21"
#: Stands in for an image inside a tool result (e.g. a screenshot a tool took).
IMAGE_OMITTED: Final = "[image omitted: this gateway serves text-only models]"


@dataclass(frozen=True)
class Translated:
    draft: JobDraft
    thinking: bool
    """Whether the client asked for thinking blocks."""


def parse(body: bytes) -> MessagesRequest:
    """Decode a Messages body.

    Raises:
        ApiError: 400 naming the offending field (``max_tokens: Expected `int` …``).
    """
    return decode_body(body, _decoder)


def _text(blocks: str | list[ContentBlockIn] | None, joiner: str) -> str:
    if blocks is None:
        return ""
    if isinstance(blocks, str):
        return blocks
    return joiner.join(b.text or "" for b in blocks if b.type == "text")


def _tool_result_text(block: ContentBlockIn) -> str:
    """A tool result's content: text blocks joined, images replaced by a note (their base64 would
    flood a text model's context), other blocks JSON-encoded."""
    content = block.content
    if content is None or isinstance(content, str):
        return content or ""
    parts = [
        b.text or "" if b.type == "text"
        else IMAGE_OMITTED if b.type == "image"
        else _json.encode(b).decode()
        for b in content
    ]
    return "\n".join(parts)


def _refuse_image(where: str) -> ApiError:
    return ApiError(Reason.UNSUPPORTED, "image content is not supported by this gateway yet "
                    "(text models only)", param=where)


def _messages(system: str, messages: list[MessageIn]) -> tuple[ChatMessage, ...]:
    systems = [system] if system else []
    out: list[ChatMessage] = []
    for i, message in enumerate(messages):
        if message.role == "system":
            systems.append(_text(message.content, "\n"))
            continue
        if isinstance(message.content, str):
            out.append(ChatMessage(role=message.role, content=message.content))
            continue
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCall] = []
        for n, block in enumerate(message.content):
            match block.type:
                case "text":
                    texts.append(block.text or "")
                case "tool_result":
                    out.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id or "",
                                           content=_tool_result_text(block)))
                case "tool_use":
                    calls.append(ToolCall(
                        id=block.id or f"toolu_{i}_{n}",
                        function=ToolCallFunction(
                            name=block.name or "",
                            arguments=_json.encode(
                                block.input if block.input is not None else {}).decode(),
                        ),
                    ))
                case "thinking":
                    reasoning.append(block.thinking or "")
                case "image":
                    raise _refuse_image(f"messages[{i}].content[{n}]")
                case _:
                    pass  # redacted_thinking, documents, server tool blocks…: dropped (§8.2)
        if texts or calls or (reasoning and message.role == "assistant"):
            out.append(ChatMessage(
                role=message.role,
                content="".join(texts),
                tool_calls=tuple(calls),
                reasoning_content="".join(reasoning) or None
                if message.role == "assistant" else None,
            ))
    if systems:
        out.insert(0, ChatMessage(role="system", content="\n\n".join(systems)))
    return tuple(out)


def _tools(tools: list[ToolIn] | None) -> tuple[ToolDefinition, ...]:
    out: list[ToolDefinition] = []
    for i, tool in enumerate(tools or ()):
        if tool.type == "function" and tool.function is not None:
            out.append(within_bus_limits(ToolDefinition(
                name=tool.function.name, description=tool.function.description,
                parameters=tool.function.parameters or {"type": "object"},
            ), param=f"tools[{i}].function"))
        elif tool.type in (None, "custom"):
            if not tool.name:
                raise bad_request(f"tools.{i}.name: Field required", param=f"tools[{i}].name")
            out.append(within_bus_limits(ToolDefinition(
                name=tool.name, description=tool.description,
                parameters=tool.input_schema or {"type": "object"},
            ), param=f"tools[{i}]"))
        # else: a server tool (web_search, bash…): this gateway cannot run it; dropped (§8.2)
    return tuple(out)


def translate(
    request: MessagesRequest, *, model: str, version: str | None, count_only: bool = False
) -> Translated:
    """Validate a Messages request and translate it for ``model`` (already resolved).

    Raises:
        ApiError: 400 naming the offending field.
    """
    if not count_only:
        if request.max_tokens is None:
            raise bad_request("max_tokens: Field required", param="max_tokens")
        if request.max_tokens < 1:
            raise bad_request("max_tokens: must be at least 1", param="max_tokens")
    if not request.messages:
        raise bad_request("messages: at least one message is required", param="messages")
    stop = tuple(request.stop_sequences or ())
    if len(stop) > _MAX_STOP or any(not s for s in stop):
        raise bad_request(f"stop_sequences: takes up to {_MAX_STOP} non-empty strings",
                          param="stop_sequences")
    if isinstance(request.system, list) and any(b.type == "image" for b in request.system):
        raise _refuse_image("system")
    honour_sampling = version != _NO_SAMPLING_VERSION
    temperature = request.temperature if honour_sampling else None
    top_p = request.top_p if honour_sampling else None
    top_k = request.top_k if honour_sampling else None
    if temperature is not None and not 0.0 <= temperature <= 1.0:
        raise bad_request("temperature: must be between 0 and 1", param="temperature")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise bad_request("top_p: must be greater than 0 and at most 1", param="top_p")
    if top_k is not None and top_k < 0:
        raise bad_request("top_k: must be >= 0", param="top_k")
    thinking = request.thinking.type if request.thinking is not None else None
    kwargs: dict[str, str | int | float | bool | None] = {}
    if thinking == "disabled":
        kwargs["enable_thinking"] = False
    tools = _tools(request.tools)
    if request.tool_choice is not None and request.tool_choice.type == "none":
        tools = ()
    draft = JobDraft(
        model=model,
        messages=_messages(_text(request.system, "\n"), request.messages),
        sampling=Sampling(max_tokens=request.max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, stop=stop),
        tools=tools,
        chat_template_kwargs=kwargs,
    )
    return Translated(draft=draft, thinking=thinking in ("enabled", "adaptive"))
