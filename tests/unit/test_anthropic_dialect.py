"""Anthropic Messages → bus job translation (REFERENCE §8.2) and the rendering of outcomes into
messages, stream events and errors (§8.3-8.6)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from bus_schema.messages import ChatMessage, ToolDefinition
from cortex.dialects.anthropic import render
from cortex.dialects.anthropic.translate import Translated, parse, translate
from cortex.errors import ApiError, Reason
from cortex.http import write_batches
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

USER = {"role": "user", "content": "hi"}


def tr(version: str | None = None, count_only: bool = False, **body: Any) -> Translated:
    body.setdefault("model", "m/x")
    if not count_only:
        body.setdefault("max_tokens", 100)
    body.setdefault("messages", [USER])
    return translate(parse(json.dumps(body).encode()), model="m/x", version=version,
                     count_only=count_only)


def roles(messages: tuple[ChatMessage, ...]) -> list[tuple[str, str | None]]:
    return [(m.role, m.content) for m in messages]


def refused(**body: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        tr(**body)
    return info.value


# ------------------------------------------------------------------ parsing and validation


def test_missing_max_tokens_has_anthropics_text() -> None:
    error = refused(max_tokens=None)
    assert error.reason is Reason.INVALID_REQUEST and error.spec.status == 400
    assert error.message == "max_tokens: Field required"
    assert error.param == "max_tokens"


def test_count_tokens_needs_no_max_tokens() -> None:
    assert tr(count_only=True).draft.sampling.max_tokens is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{nope", "not valid JSON"),
        (b"  ", "empty"),
        (b'{"model":"m","max_tokens":"lots","messages":[]}', "max_tokens: Expected `int"),
    ],
)
def test_bad_json_is_a_400(body: bytes, fragment: str) -> None:
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.spec.status == 400
    assert info.value.spec.anthropic_type == "invalid_request_error"
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        ({"stop_sequences": [str(i) for i in range(17)]}, "stop_sequences"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"tools": [{"description": "no name"}]}, "tools[0].name"),
    ],
)
def test_invalid_values_name_their_parameter(body: dict[str, Any], param: str) -> None:
    assert refused(**body).param == param


def test_unknown_fields_are_ignored() -> None:
    draft = tr(metadata={"user_id": "u"}, context_management={"edits": []},
               output_config={"effort": "low"}, service_tier="auto",
               messages=[{"role": "user", "content": [
                   {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]).draft
    assert roles(draft.messages) == [("user", "hi")]


# ------------------------------------------------------------------ system merge


def test_system_string_and_system_messages_become_one_leading_message() -> None:
    draft = tr(system="Be brief.", messages=[
        USER, {"role": "assistant", "content": "yo"},
        {"role": "system", "content": "Late."},
        {"role": "system", "content": [{"type": "text", "text": "A"},
                                       {"type": "text", "text": "B"}]},
        {"role": "user", "content": "again"},
    ]).draft
    assert roles(draft.messages) == [
        ("system", "Be brief.\n\nLate.\n\nA\nB"), ("user", "hi"), ("assistant", "yo"),
        ("user", "again"),
    ]


def test_system_blocks_are_joined_with_newlines() -> None:
    draft = tr(system=[{"type": "text", "text": "One."},
                       {"type": "text", "text": "Two.", "cache_control": {"type": "ephemeral"}}]
               ).draft
    assert roles(draft.messages) == [("system", "One.\nTwo."), ("user", "hi")]


def test_no_system_means_no_system_message() -> None:
    assert roles(tr().draft.messages) == [("user", "hi")]
    assert roles(tr(system="").draft.messages) == [("user", "hi")]


# ------------------------------------------------------------------ content blocks


def test_text_blocks_are_concatenated() -> None:
    draft = tr(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]).draft
    assert roles(draft.messages) == [("user", "ab")]


def test_tool_results_come_before_the_rest_of_their_message() -> None:
    draft = tr(messages=[
        USER,
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
            {"type": "tool_use", "id": "t2", "name": "g", "input": {}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "before "},
            {"type": "tool_result", "tool_use_id": "t1", "content": "one"},
            {"type": "text", "text": "after"},
            {"type": "tool_result", "tool_use_id": "t2", "is_error": True,
             "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
        ]},
    ]).draft
    messages = draft.messages
    assert [(m.role, m.tool_call_id, m.content) for m in messages[2:]] == [
        ("tool", "t1", "one"), ("tool", "t2", "x\ny"), ("user", None, "before after"),
    ]


def test_a_message_of_only_tool_results_leaves_no_empty_user_message() -> None:
    draft = tr(messages=[
        USER,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
    ]).draft
    assert roles(draft.messages) == [("user", "hi"), ("assistant", ""), ("tool", "")]


def test_tool_result_non_text_blocks_are_json_encoded_as_sent() -> None:
    block = {"type": "search_result", "source": {"type": "url", "url": "https://x.test"}}
    draft = tr(messages=[
        USER,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "found"}, block]}]},
    ]).draft
    text, encoded = (draft.messages[2].content or "").split("\n")
    assert text == "found"
    assert json.loads(encoded) == block


def test_tool_use_becomes_tool_calls_with_json_arguments() -> None:
    draft = tr(messages=[
        USER,
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris", "nested": {"days": [1, 2]}}},
            {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}}]},
    ]).draft
    assistant = draft.messages[1]
    assert (assistant.role, assistant.content) == ("assistant", "Let me check.")
    assert [c.id for c in assistant.tool_calls] == ["toolu_1", "toolu_2"]
    assert [c.type for c in assistant.tool_calls] == ["function", "function"]
    assert assistant.tool_calls[0].function.name == "get_weather"
    assert json.loads(assistant.tool_calls[0].function.arguments) == {
        "city": "Paris", "nested": {"days": [1, 2]}}
    assert json.loads(assistant.tool_calls[1].function.arguments) == {}


def test_thinking_history_becomes_reasoning_content() -> None:
    draft = tr(messages=[
        USER,
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "yo"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "only thoughts", "signature": "s"}]},
        {"role": "user", "content": [{"type": "thinking", "thinking": "user?", "signature": "s"},
                                     {"type": "text", "text": "again"}]},
    ]).draft
    messages = draft.messages
    assert (messages[1].content, messages[1].reasoning_content) == ("yo", "hmm")
    assert (messages[2].content, messages[2].reasoning_content) == ("", "only thoughts")
    assert (messages[3].role, messages[3].content, messages[3].reasoning_content) == (
        "user", "again", None)


def test_unknown_blocks_are_dropped() -> None:
    draft = tr(messages=[
        {"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "data": "doc"}},
            {"type": "text", "text": "hi"},
            {"type": "brand_new_block", "whatever": [1, 2]}]},
        {"role": "assistant", "content": [
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}},
            {"type": "web_search_tool_result", "tool_use_id": "s1", "content": []},
            {"type": "text", "text": "yo"}]},
    ]).draft
    assert roles(draft.messages) == [("user", "hi"), ("assistant", "yo")]
    assert draft.messages[1].tool_calls == ()


@pytest.mark.parametrize(
    ("messages", "system", "param"),
    [
        ([{"role": "user", "content": [
            {"type": "text", "text": "what?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AAAA"}}]}], None, "messages[0].content[1]"),
        ([USER, {"role": "assistant", "content": "a"}, {"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]}],
         None, "messages[2].content[0]"),
        ([USER], [{"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}],
         "system"),
    ],
)
def test_images_are_refused_with_a_400_naming_the_block(
    messages: list[Any], system: Any, param: str
) -> None:
    error = refused(messages=messages, system=system)
    assert error.reason is Reason.UNSUPPORTED
    assert error.spec.status_for_anthropic == 400
    assert error.spec.anthropic_type == "invalid_request_error"
    assert error.param == param


# ------------------------------------------------------------------ tools


WEATHER = {"name": "get_weather", "description": "Weather",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_client_tools_become_functions() -> None:
    tools = tr(tools=[WEATHER, {"name": "bare"}, {"type": "custom", "name": "c",
                                                 "input_schema": {"type": "object"}}]
               ).draft.tools
    assert tools == (
        ToolDefinition(name="get_weather", description="Weather",
                       parameters=WEATHER["input_schema"]),  # type: ignore[arg-type]
        ToolDefinition(name="bare", parameters={"type": "object"}),
        ToolDefinition(name="c", parameters={"type": "object"}),
    )


def test_openai_shaped_tools_pass_through() -> None:
    tools = tr(tools=[
        {"type": "function", "function": {"name": "f", "description": "d",
                                          "parameters": {"type": "object", "required": ["a"]}}},
        {"type": "function", "function": {"name": "g"}},
    ]).draft.tools
    assert tools == (
        ToolDefinition(name="f", description="d",
                       parameters={"type": "object", "required": ["a"]}),
        ToolDefinition(name="g", parameters={"type": "object"}),
    )


def test_server_tools_are_dropped() -> None:
    tools = tr(tools=[
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
        WEATHER,
    ]).draft.tools
    assert [t.name for t in tools] == ["get_weather"]


@pytest.mark.parametrize(
    ("choice", "kept"),
    [
        ({"type": "none"}, False),
        ({"type": "auto"}, True),
        ({"type": "any"}, True),
        ({"type": "tool", "name": "get_weather"}, True),
    ],
)
def test_tool_choice_none_drops_the_tools(choice: dict[str, str], kept: bool) -> None:
    tools = tr(tools=[WEATHER], tool_choice=choice).draft.tools
    assert [t.name for t in tools] == (["get_weather"] if kept else [])


# ------------------------------------------------------------------ thinking and sampling


@pytest.mark.parametrize(
    ("thinking", "blocks", "kwargs"),
    [
        (None, False, {}),
        ({"type": "enabled", "budget_tokens": 1024}, True, {}),
        ({"type": "adaptive"}, True, {}),
        ({"type": "disabled"}, False, {"enable_thinking": False}),
    ],
)
def test_thinking(thinking: Any, blocks: bool, kwargs: dict[str, Any]) -> None:
    translated = tr(thinking=thinking)
    assert translated.thinking is blocks
    assert translated.draft.chat_template_kwargs == kwargs


def test_sampling_and_stop_sequences() -> None:
    sampling = tr(max_tokens=7, temperature=0.3, top_p=0.9, top_k=4,
                  stop_sequences=["END", "\n\nHuman:"]).draft.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (
        7, 0.3, 0.9, 4)
    assert sampling.stop == ("END", "\n\nHuman:")


@pytest.mark.parametrize("version", [None, "2023-06-01"])
def test_sampling_is_honoured_by_default_and_under_2023(version: str | None) -> None:
    sampling = tr(version=version, temperature=0.3, top_k=4).draft.sampling
    assert (sampling.temperature, sampling.top_k) == (0.3, 4)
    assert refused(temperature=3.0).param == "temperature"


def test_sampling_is_ignored_under_2026() -> None:
    sampling = tr(version="2026-10-21", temperature=3.0, top_p=0, top_k=-5).draft.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (None, None, None)


# ------------------------------------------------------------------ rendering


@pytest.mark.parametrize(
    ("finished", "expected"),
    [
        (Finished("stop", 1, 2), "end_turn"),
        (Finished("stop", 1, 2, "END"), "stop_sequence"),
        (Finished("length", 1, 2), "max_tokens"),
        (Finished("tool_calls", 1, 2), "tool_use"),
    ],
)
def test_stop_reason(finished: Finished, expected: str) -> None:
    assert render.stop_reason(finished) == expected


def test_prompt_too_long_message_is_claude_codes_exact_text() -> None:
    error = ApiError(Reason.PROMPT_TOO_LONG, "prompt has 300 tokens but max is 255",
                     prompt_tokens=300, max_prompt_tokens=255)
    body = json.loads(render.error_body(error, "req_1"))
    assert body == {"type": "error", "request_id": "req_1", "error": {
        "type": "invalid_request_error", "message": "prompt is too long: 300 tokens > 255 maximum"}}


@pytest.mark.parametrize(
    ("reason", "status", "error_type"),
    [
        (Reason.OVERLOADED, 529, "overloaded_error"),
        (Reason.NO_WORKER, 529, "overloaded_error"),
        (Reason.MODEL_NOT_FOUND, 404, "not_found_error"),
        (Reason.ENGINE_ERROR, 502, "api_error"),
        (Reason.TOO_LARGE, 413, "request_too_large"),
    ],
)
def test_error_statuses(reason: Reason, status: int, error_type: str) -> None:
    error = ApiError(reason, "x")
    assert error.spec.status_for_anthropic == status
    assert json.loads(render.error_body(error, "r"))["error"]["type"] == error_type


def completion(text: str = "", reasoning: str = "",
               calls: tuple[ToolCallDelta, ...] = (), reason: str = "stop") -> Completion:
    finished = Finished("tool_calls" if calls else "length" if reason == "length" else "stop",
                        10, 4)
    return Completion(text, reasoning, calls, finished)


def body_of(done: Completion, *, thinking: bool) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(render.message(done, msg_id="msg_1", model="m/x",
                                                    thinking=thinking))
    return out


def test_message_body() -> None:
    body = body_of(completion("Hi", "hmm", (ToolCallDelta(0, "call_a", "f", '{"a":1}'),
                                            ToolCallDelta(1, "call_b", "g", "not json"),
                                            ToolCallDelta(2, "call_c", "h", "[1]"))),
                   thinking=True)
    assert body == {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m/x",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": render.SIGNATURE},
            {"type": "text", "text": "Hi"},
            {"type": "tool_use", "id": "call_a", "name": "f", "input": {"a": 1}},
            {"type": "tool_use", "id": "call_b", "name": "g", "input": {}},
            {"type": "tool_use", "id": "call_c", "name": "h", "input": {}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 4, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0},
    }


def test_message_has_no_thinking_unless_asked_and_no_empty_text() -> None:
    assert body_of(completion("Hi", "hmm"), thinking=False)["content"] == [
        {"type": "text", "text": "Hi"}]
    assert body_of(completion("", "hmm"), thinking=False)["content"] == []
    assert body_of(completion("", "", (ToolCallDelta(0, "c", "f", "{}"),)),
                   thinking=True)["content"] == [
        {"type": "tool_use", "id": "c", "name": "f", "input": {}}]


def parse_events(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"\n\n") and b"\r" not in raw
    out: list[dict[str, Any]] = []
    for frame in raw[:-2].split(b"\n\n"):
        event, data = frame.split(b"\n")
        payload: dict[str, Any] = json.loads(data.removeprefix(b"data: "))
        assert event == b"event: " + payload["type"].encode()
        out.append(payload)
    return out


async def outcomes_of(*items: Outcome) -> AsyncGenerator[list[Outcome], None]:
    """Batches as the relay yields them: one batch per outcome, and the last two together."""
    *head, last = items
    for item in head[:-1]:
        yield [item]
    yield [*head[-1:], last]


async def stream_of(*items: Outcome, thinking: bool) -> list[dict[str, Any]]:
    events = render.MessageEvents(msg_id="msg_1", model="m/x", input_tokens=12,
                                  thinking=thinking)
    raw = b"".join([chunk async for chunk in write_batches(outcomes_of(*items), events.render,
                                                        opening=events.start())])
    return parse_events(raw)


async def test_stream_sequence_with_thinking_text_and_tools() -> None:
    events = await stream_of(
        ReasoningDelta("Let "), ReasoningDelta("me"), KeepAlive(), TextDelta("Hi"),
        TextDelta(" there"), ToolCallDelta(0, "call_a", "f", '{"a":1}'),
        ToolCallDelta(1, "call_b", "g", "{}"), Finished("tool_calls", 12, 9),
        thinking=True,
    )
    assert [e["type"] for e in events] == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_delta", "ping",
        "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    assert events[0]["message"]["usage"]["input_tokens"] == 12
    assert events[0]["message"]["content"] == []
    assert events[2]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[6] == {"type": "content_block_delta", "index": 0,
                         "delta": {"type": "signature_delta", "signature": render.SIGNATURE}}
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [e["index"] for e in starts] == [0, 1, 2, 3]
    assert starts[2]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "f",
                                          "input": {}}
    assert events[13]["delta"] == {"type": "input_json_delta", "partial_json": '{"a":1}'}
    assert events[-2] == {"type": "message_delta",
                          "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"input_tokens": 12, "output_tokens": 9}}


async def test_stream_without_thinking_drops_reasoning() -> None:
    events = await stream_of(ReasoningDelta("secret"), TextDelta("Hi"), ReasoningDelta("more"),
                             TextDelta("!"), Finished("stop", 12, 4, "END"), thinking=False)
    assert [e["type"] for e in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert "secret" not in json.dumps(events) and "thinking" not in json.dumps(events)
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


async def test_stream_failure_is_an_error_event_without_message_stop() -> None:
    error = ApiError(Reason.ENGINE_ERROR, "boom")
    events = await stream_of(TextDelta("Hi"), Failed(error), thinking=False)
    assert [e["type"] for e in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "error"]
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "boom"}}


def test_ids_are_unique_and_prefixed() -> None:
    assert render.request_id().startswith("req_")
    assert render.message_id().startswith("msg_")
    assert len({render.message_id() for _ in range(50)}) == 50


def test_images_inside_tool_results_become_a_note_not_base64() -> None:
    from cortex.dialects.anthropic.translate import IMAGE_OMITTED, parse, translate

    body = (b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":'
            b'"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"shot:"},'
            b'{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}'
            b']}]}]}')
    draft = translate(parse(body), model="m", version=None).draft
    assert draft.messages[0].role == "tool"
    assert draft.messages[0].content == f"shot:\n{IMAGE_OMITTED}"
