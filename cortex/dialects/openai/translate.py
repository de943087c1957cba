"""OpenAI requests → `JobDraft`: decoding with the offending field named, semantic checks, and the
translation of messages, tools and sampling (REFERENCE §7.1)."""

from __future__ import annotations

from typing import Final

import msgspec

from bus_schema.messages import ChatMessage, ToolCall, ToolCallFunction, ToolDefinition
from cortex.dialects.openai.shapes import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    ToolIn,
    _SamplingFields,
)
from cortex.dispatch import JobDraft, Sampling
from cortex.errors import ApiError, Reason, bad_request
from cortex.http import decode_body, within_bus_limits

_chat_decoder: Final = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder: Final = msgspec.json.Decoder(CompletionRequest)
_json: Final = msgspec.json.Encoder()
_MAX_STOP: Final = 16
#: OpenAI's documented default for ``/v1/completions`` (vLLM follows it too).
LEGACY_DEFAULT_MAX_TOKENS: Final = 16


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    return decode_body(body, _chat_decoder)


def parse_completion_request(body: bytes) -> CompletionRequest:
    return decode_body(body, _completion_decoder)


def require_model(model: str | None) -> str:
    if not model:
        raise bad_request("missing 'model' field in request body", param="model")
    return model


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
            raise ApiError(
                Reason.UNSUPPORTED,
                f"content part type '{part.type}' is not supported by this gateway yet "
                "(text only)",
                param=f"messages[{index}].content[{n}].type",
            )
    return "".join(texts)


def _check_range(value: float | None, name: str, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise bad_request(f"'{name}' must be between {lo:g} and {hi:g}, got {value:g}", param=name)


def sampling(request: _SamplingFields, *, max_tokens: int | None, max_tokens_name: str) -> Sampling:
    """Validated sampling parameters shared by chat and legacy completions.

    Raises:
        ApiError: 400 naming the offending parameter.
    """
    if request.n is not None and request.n != 1:
        raise bad_request("only n=1 is supported", param="n")
    _check_range(request.temperature, "temperature", 0.0, 2.0)
    _check_range(request.top_p, "top_p", 1e-9, 1.0)
    _check_range(request.presence_penalty, "presence_penalty", -2.0, 2.0)
    _check_range(request.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    if request.repetition_penalty is not None and request.repetition_penalty <= 0:
        raise bad_request("'repetition_penalty' must be positive", param="repetition_penalty")
    if request.top_k is not None and request.top_k < 0:
        raise bad_request("'top_k' must be >= 0 (0 disables it)", param="top_k")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'{max_tokens_name}' must be at least 1", param=max_tokens_name)
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > _MAX_STOP or any(not s for s in stop):
        raise bad_request(f"'stop' takes 1 to {_MAX_STOP} non-empty strings", param="stop")
    return Sampling(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        stop=stop,
        repetition_penalty=request.repetition_penalty,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
    )


def _arguments_text(arguments: str | dict[str, object]) -> str:
    return arguments if isinstance(arguments, str) else _json.encode(arguments).decode()


def _message(message: ChatMessageIn, index: int) -> ChatMessage:
    return ChatMessage(
        role="system" if message.role == "developer" else message.role,
        content=_flatten(message, index),
        name=message.name,
        tool_calls=tuple(
            ToolCall(id=c.id, function=ToolCallFunction(
                name=c.function.name, arguments=_arguments_text(c.function.arguments)))
            for c in message.tool_calls or ()
        ),
        tool_call_id=message.tool_call_id,
        reasoning_content=message.reasoning_content,
    )


def tool_definitions(tools: list[ToolIn] | None) -> tuple[ToolDefinition, ...]:
    """OpenAI ``tools`` → bus tool definitions.

    Raises:
        ApiError: 400 for a tool that is not a function with a name.
    """
    out: list[ToolDefinition] = []
    for i, tool in enumerate(tools or ()):
        if tool.type != "function" or tool.function is None or not tool.function.name:
            raise bad_request("each tool must be {\"type\": \"function\", \"function\": "
                              "{\"name\": …}}", param=f"tools[{i}]")
        out.append(within_bus_limits(ToolDefinition(
            name=tool.function.name,
            description=tool.function.description,
            parameters=tool.function.parameters or {"type": "object", "properties": {}},
        ), param=f"tools[{i}].function"))
    return tuple(out)


def chat_draft(request: ChatCompletionRequest, *, model: str) -> JobDraft:
    """Validate a chat request and translate it for ``model`` (already resolved).

    ``tool_choice: "none"`` drops the tools (REFERENCE §6.4); other choices are advisory: the
    model sees the tools and decides.

    Raises:
        ApiError: 400 naming the offending parameter.
    """
    if not request.messages:
        raise bad_request("'messages' must be a non-empty array", param="messages")
    use_completion = request.max_completion_tokens is not None
    params = sampling(
        request,
        max_tokens=request.max_completion_tokens if use_completion else request.max_tokens,
        max_tokens_name="max_completion_tokens" if use_completion else "max_tokens",
    )
    tools = tool_definitions(request.tools)
    if request.tool_choice == "none":
        tools = ()
    return JobDraft(
        model=model,
        messages=tuple(_message(m, i) for i, m in enumerate(request.messages)),
        sampling=params,
        tools=tools,
        chat_template_kwargs=dict(request.chat_template_kwargs or {}),
    )


def completion_draft(request: CompletionRequest, *, model: str) -> JobDraft:
    """Validate a legacy completion request: one prompt, no echo, no suffix.

    Raises:
        ApiError: 400 naming the offending parameter.
    """
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("'prompt' must be a string or a list of exactly one string",
                              param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise bad_request("'prompt' must be a non-empty string", param="prompt")
    if request.suffix:
        raise ApiError(Reason.UNSUPPORTED, "'suffix' (fill-in-the-middle) is not supported",
                       param="suffix")
    if request.echo:
        raise ApiError(Reason.UNSUPPORTED, "'echo' is not supported", param="echo")
    if request.logprobs:
        raise ApiError(Reason.UNSUPPORTED, "'logprobs' is not supported", param="logprobs")
    if request.best_of is not None and request.best_of != 1:
        raise ApiError(Reason.UNSUPPORTED, "only best_of=1 is supported", param="best_of")
    return JobDraft(
        model=model,
        prompt=prompt,
        sampling=sampling(
            request,
            max_tokens=(request.max_tokens if request.max_tokens is not None
                        else LEGACY_DEFAULT_MAX_TOKENS),
            max_tokens_name="max_tokens",
        ),
    )
