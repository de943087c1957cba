"""The Anthropic wire rules (REFERENCE §8), end to end: the real Anthropic SDK and raw HTTP against
the gateway, over the real bus, to a neuron whose model is scripted.

The scripted model answers according to its rendered prompt (``"<role> content …"`` words, one
token per word), so every prompt, token count and answer byte is known in advance.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam, TextBlock, ThinkingBlock, ToolParam, ToolUseBlock

from cortex.embedded_nats import EmbeddedNatsServer
from neuron.engines.base import Finish, GenerationParams, ModelFiles, ProgressCallback, Step
from neuron.settings import ModelSpec, NeuronSettings
from neuron.text.detokenize import StopMatcher
from tests.support.scripted_engine import Script, ScriptedEngine, ScriptedModel
from tests.support.stack import LocalStack

pytestmark = pytest.mark.e2e

MODEL = "test-org/scripted-anthropic"
CONTEXT = 256
MAX_PROMPT = CONTEXT - 1  # the neuron's limit: min(max_prompt_tokens, context - 1)
CRASH = "\x00crash"
"""A scripted word on which the model raises mid-generation."""

ANSWER_WORDS = ("Hello", " from", " the", " scripted", " model", ".")
ANSWER = "".join(ANSWER_WORDS)
TOOL_WORDS = (  # markers and JSON split across tokens: the router must reassemble them
    "Let", " me", " check.", "<tool", "_call>", '{"name": "get_', 'weather", "arguments": ',
    '{"city": "Par', 'is", "days": 2}}', "</tool_", "call>",
)
TOOL_ARGS = {"city": "Paris", "days": 2}
AFTER_TOOL_WORDS = ("It", " is", " sunny", " in", " Paris.")
THINK_WORDS = ("<thi", "nk>", "Pondering", " deeply", "</th", "ink>", "Hello", " there.")
STOP_WORDS = ("alpha", " beta", " EN", "D", " gamma")
CRASH_WORDS = ("Partial", " answer", CRASH, " never")

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
WEATHER_TOOL: ToolParam = {"name": "get_weather", "description": "Get the weather",
                           "input_schema": WEATHER_SCHEMA}
TOOLS_JSON = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather", "parameters": WEATHER_SCHEMA}}],
    sort_keys=True)
QUESTION = "What is the weather in Paris?"


def reply(prompt: str) -> Sequence[str]:
    """The scripted model's answer to a rendered prompt."""
    if "<tool> " in prompt:  # a tool result is in the conversation
        return AFTER_TOOL_WORDS
    if prompt.startswith("<tools> "):
        return TOOL_WORDS
    for trigger, words in (("THINK", THINK_WORDS), ("STOPSEQ", STOP_WORDS),
                           ("CRASH", CRASH_WORDS)):
        if trigger in prompt:
            return words
    return ANSWER_WORDS


@dataclass
class RecordingModel(ScriptedModel):
    """The scripted model, plus what the torch engine does with stop strings, a crash on demand,
    and a record of every text it tokenised and every job's parameters."""

    params: list[GenerationParams] = field(default_factory=list)
    encoded: list[str] = field(default_factory=list)

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return super().encode(text)

    def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams, cancelled: threading.Event
    ) -> Iterator[Step | Finish]:
        self.params.append(params)
        stopper = StopMatcher(params.stop)
        for item in super().generate(prompt_ids, params, cancelled):
            if isinstance(item, Finish):
                yield replace(item, text=item.text + stopper.flush())
                return
            if item.text == CRASH:
                raise RuntimeError("scripted device failure")
            text, matched = stopper.push(item.text)
            yield Step(token_id=item.token_id, text=text)
            if matched is not None:
                yield Finish(reason="stop", completion_tokens=item.token_id + 1,
                             stop_sequence=matched)
                return


class RecordingEngine(ScriptedEngine):
    def __init__(self, script: Script) -> None:
        super().__init__(script)
        self.models: list[RecordingModel] = []

    def load(self, files: ModelFiles, progress: ProgressCallback) -> RecordingModel:
        progress(1.0, "loaded")
        model = RecordingModel(files=files, script=self.script)
        self.loaded.append(model)
        self.models.append(model)
        return model


@pytest.fixture(scope="module")
def engine() -> RecordingEngine:
    return RecordingEngine(Script(reply=reply, context_length=CONTEXT))


@pytest.fixture(scope="module")
def stack(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory,
    engine: RecordingEngine,
) -> Iterator[LocalStack]:
    model_file = tmp_path_factory.mktemp("scripted") / "scripted.gguf"
    model_file.write_bytes(b"")
    with LocalStack(
        nats_url=nats_server.url, root="e2e-anthropic", engine=engine,
        models=[ModelSpec(source=str(model_file), served_name=MODEL)],
    ) as running:
        yield running


@pytest.fixture
def model(engine: RecordingEngine, stack: LocalStack) -> RecordingModel:
    return engine.models[0]


@pytest.fixture
def client(stack: LocalStack) -> Iterator[anthropic.Anthropic]:
    with stack.anthropic_client() as c:
        yield c


# ------------------------------------------------------------------ helpers

Event = tuple[str, dict[str, Any]]


def post(stack: LocalStack, body: object, *, path: str = "/v1/messages",
         headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{stack.base_url}{path}", json=body, headers=headers, timeout=10)


def stream_raw(stack: LocalStack, body: dict[str, Any]) -> tuple[httpx.Response, list[Event]]:
    """POST a streaming request; the response (read) and its events, framing checked."""
    with httpx.stream("POST", f"{stack.base_url}/v1/messages", json={**body, "stream": True},
                      timeout=10) as response:
        raw = response.read()
    assert response.status_code == 200, raw
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["request-id"].startswith("req_")
    assert b"\r" not in raw and b"[DONE]" not in raw
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"", "the stream must end with a complete event"
    events: list[Event] = []
    for frame in frames[:-1]:
        lines = frame.split(b"\n")
        assert len(lines) == 2, frame
        assert lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), frame
        name = lines[0].removeprefix(b"event: ").decode()
        data = json.loads(lines[1].removeprefix(b"data: "))
        assert data["type"] == name, "every event line must equal data.type"
        events.append((name, data))
    return response, events


@dataclass
class Block:
    start: dict[str, Any]
    deltas: list[dict[str, Any]]


def blocks_of(events: list[Event]) -> list[Block]:
    """Check the §8.5 sequence of a complete stream and return its content blocks."""
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert names.count("message_start") == names.count("message_delta") == 1
    assert names.count("message_stop") == 1
    blocks: list[Block] = []
    open_index: int | None = None
    for name, data in events[2:-2]:
        match name:
            case "content_block_start":
                assert open_index is None, "one block open at a time"
                assert data["index"] == len(blocks), "blocks are indexed 0..k in order"
                open_index = data["index"]
                blocks.append(Block(data["content_block"], []))
            case "content_block_delta":
                assert data["index"] == open_index
                blocks[-1].deltas.append(data["delta"])
            case "content_block_stop":
                assert data["index"] == open_index
                open_index = None
            case _:
                assert name == "ping", name
    assert open_index is None, "every block is stopped before message_delta"
    return blocks


def message_start(events: list[Event]) -> dict[str, Any]:
    message: dict[str, Any] = events[0][1]["message"]
    return message


def message_delta(events: list[Event]) -> dict[str, Any]:
    return events[-2][1]


def text_of(block: Block) -> str:
    assert block.start == {"type": "text", "text": ""}
    assert all(d["type"] == "text_delta" for d in block.deltas)
    return "".join(d["text"] for d in block.deltas)


def prompt_of(text: str) -> str:
    """The scripted model's rendering of one user message."""
    return f"<user> {text} <assistant>"


def tokens(prompt: str) -> int:
    return len(prompt.split())


def assert_error(response: httpx.Response, status: int, error_type: str) -> str:
    """An error in Anthropic's shape; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"type", "error", "request_id"}
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    assert body["request_id"].startswith("req_")
    assert response.headers["request-id"] == body["request_id"]
    message: str = body["error"]["message"]
    return message


# ------------------------------------------------------------------ plain text


def test_non_streaming_text(client: anthropic.Anthropic, model: RecordingModel) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=100,
                                   messages=[{"role": "user", "content": "hi"}])
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.model == MODEL
    assert reply.id.startswith("msg_")
    assert len(reply.content) == 1
    block = reply.content[0]
    assert isinstance(block, TextBlock) and block.text == ANSWER
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    assert model.prompts[-1] == prompt_of("hi")
    assert reply.usage.input_tokens == tokens(prompt_of("hi")) == 3
    assert reply.usage.output_tokens == len(ANSWER_WORDS)
    assert reply.usage.cache_creation_input_tokens == 0
    assert reply.usage.cache_read_input_tokens == 0


def test_non_streaming_body_and_headers(stack: LocalStack) -> None:
    response = post(stack, {"model": MODEL, "max_tokens": 50,
                            "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["request-id"].startswith("req_")
    body = response.json()
    assert body == {
        "id": body["id"], "type": "message", "role": "assistant", "model": MODEL,
        "content": [{"type": "text", "text": ANSWER}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 6, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0},
    }
    second = post(stack, {"model": MODEL, "max_tokens": 50,
                          "messages": [{"role": "user", "content": "hi"}]})
    assert second.json()["id"] != body["id"]
    assert second.headers["request-id"] != response.headers["request-id"]


def test_streaming_with_the_sdk(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    raw_types = [e.type for e in events if e.type in {
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"}]
    assert raw_types[0] == "message_start"
    assert raw_types[1] == "content_block_start"
    assert raw_types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw_types[2:-3]) == {"content_block_delta"}
    start = events[0]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == 3
    assert [b.type for b in final.content] == ["text"]
    assert isinstance(final.content[0], TextBlock) and final.content[0].text == ANSWER
    assert final.stop_reason == "end_turn" and final.stop_sequence is None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 6)
    assert final.model == MODEL and final.id.startswith("msg_")


def test_stream_framing_is_exact(stack: LocalStack) -> None:
    _, events = stream_raw(stack, {"model": MODEL, "max_tokens": 100,
                                   "messages": [{"role": "user", "content": "hi"}]})
    start = message_start(events)
    assert start["id"].startswith("msg_")
    assert start == {
        "id": start["id"], "type": "message", "role": "assistant", "model": MODEL,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": start["usage"]["output_tokens"],
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }
    assert events[1][1] == {"type": "ping"}
    blocks = blocks_of(events)
    assert len(blocks) == 1 and text_of(blocks[0]) == ANSWER
    assert all(d["text"] for d in blocks[0].deltas), "no empty deltas"
    assert message_delta(events) == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 3, "output_tokens": 6},
    }
    assert events[-1][1] == {"type": "message_stop"}


# ------------------------------------------------------------------ stopping


def test_stop_sequence(client: anthropic.Anthropic, model: RecordingModel) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=100, stop_sequences=["END", "zzz"],
                                   messages=[{"role": "user", "content": "STOPSEQ now"}])
    assert model.params[-1].stop == ("END", "zzz")
    assert reply.stop_reason == "stop_sequence"
    assert reply.stop_sequence == "END"
    assert [b.type for b in reply.content] == ["text"]
    assert isinstance(reply.content[0], TextBlock) and reply.content[0].text == "alpha beta "
    assert reply.usage.output_tokens == 4


def test_stop_sequence_streaming(client: anthropic.Anthropic, stack: LocalStack) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 100, "stop_sequences": ["END"],
                            "messages": [{"role": "user", "content": "STOPSEQ now"}]}
    _, events = stream_raw(stack, body)
    assert text_of(blocks_of(events)[0]) == "alpha beta "
    assert message_delta(events)["delta"] == {"stop_reason": "stop_sequence",
                                              "stop_sequence": "END"}
    with client.messages.stream(model=MODEL, max_tokens=100, stop_sequences=["END"],
                                messages=[{"role": "user", "content": "STOPSEQ now"}]) as s:
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")


def test_small_max_tokens_stops_with_max_tokens(
    client: anthropic.Anthropic, stack: LocalStack, model: RecordingModel
) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=2,
                                   messages=[{"role": "user", "content": "hi"}])
    assert model.params[-1].max_tokens == 2
    assert reply.stop_reason == "max_tokens" and reply.stop_sequence is None
    assert isinstance(reply.content[0], TextBlock) and reply.content[0].text == "Hello from"
    assert reply.usage.output_tokens == 2
    _, events = stream_raw(stack, {"model": MODEL, "max_tokens": 2,
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert message_delta(events)["delta"]["stop_reason"] == "max_tokens"
    assert message_delta(events)["usage"]["output_tokens"] == 2


def test_claude_code_sized_max_tokens_is_clamped(
    client: anthropic.Anthropic, model: RecordingModel
) -> None:
    with client.messages.stream(model=MODEL, max_tokens=128000,  # Claude Code streams
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        reply = stream.get_final_message()
    assert reply.stop_reason == "end_turn"
    assert model.params[-1].max_tokens == CONTEXT - 3


# ------------------------------------------------------------------ system merge


def test_system_blocks_become_one_leading_system_message(
    client: anthropic.Anthropic, model: RecordingModel
) -> None:
    reply = client.messages.create(
        model=MODEL, max_tokens=50,
        system=[{"type": "text", "text": "Rule one."},
                {"type": "text", "text": "Rule two.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hi"}],
    )
    expected = "<system> Rule one.\nRule two. <user> hi <assistant>"
    assert model.prompts[-1] == expected
    assert reply.usage.input_tokens == tokens(expected)


@pytest.mark.parametrize(
    ("system", "messages", "expected"),
    [
        ("You are terse.",
         [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
          {"role": "system", "content": "Late rule."}, {"role": "user", "content": "again"}],
         "<system> You are terse.\n\nLate rule. <user> hi <assistant> yo <user> again"),
        ([{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two."}],
         [{"role": "system", "content": [{"type": "text", "text": "Extra rule."}]},
          {"role": "user", "content": "hi"}],
         "<system> Rule one.\nRule two.\n\nExtra rule. <user> hi"),
        (None,
         [{"role": "user", "content": "hi"}, {"role": "system", "content": "Only rule."}],
         "<system> Only rule. <user> hi"),
    ],
)
def test_system_and_system_messages_merge_into_one(
    stack: LocalStack, model: RecordingModel, system: object, messages: list[object],
    expected: str,
) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "messages": messages}
    if system is not None:
        body["system"] = system
    response = post(stack, body)
    assert response.status_code == 200, response.text
    prompt = model.prompts[-1]
    assert prompt == expected + " <assistant>"
    assert prompt.count("<system>") == 1
    assert response.json()["usage"]["input_tokens"] == tokens(prompt)


# ------------------------------------------------------------------ tools


def call_json(tool_use_id: str) -> str:
    return json.dumps({"id": tool_use_id, "type": "function",
                       "function": {"name": "get_weather", "arguments": TOOL_ARGS}},
                      sort_keys=True)


def follow_up(tool_use_id: str, text: str = "Let me check.") -> list[MessageParam]:
    """The conversation sent back: the assistant's tool call and the user's tool result."""
    return [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [
            {"type": "text", "text": text},
            {"type": "tool_use", "id": tool_use_id, "name": "get_weather", "input": TOOL_ARGS},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_use_id, "content": "sunny, 21 C"},
            {"type": "text", "text": "Thanks!"},
        ]},
    ]


def expected_follow_up_prompt(tool_use_id: str) -> str:
    """The tool result is a tool message placed before the rest of its user message."""
    return (f"<tools> {TOOLS_JSON} <user> {QUESTION} <assistant> Let me check. "
            f"<tool> sunny, 21 C <user> Thanks! <call> {call_json(tool_use_id)} <assistant>")


def test_tool_round_trip(client: anthropic.Anthropic, model: RecordingModel) -> None:
    first = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER_TOOL],
                                   messages=[{"role": "user", "content": QUESTION}])
    assert model.prompts[-1] == f"<tools> {TOOLS_JSON} {prompt_of(QUESTION)}"
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    text, call = first.content
    assert isinstance(text, TextBlock) and text.text == "Let me check."
    assert isinstance(call, ToolUseBlock)
    assert call.name == "get_weather" and call.input == TOOL_ARGS and call.id
    assert first.usage.output_tokens == len(TOOL_WORDS)
    assert first.usage.input_tokens == tokens(model.prompts[-1])

    second = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER_TOOL],
                                    messages=follow_up(call.id))
    assert model.prompts[-1] == expected_follow_up_prompt(call.id)
    assert second.stop_reason == "end_turn"
    assert [b.type for b in second.content] == ["text"]
    assert isinstance(second.content[0], TextBlock)
    assert second.content[0].text == "".join(AFTER_TOOL_WORDS)
    assert second.usage.input_tokens == tokens(expected_follow_up_prompt(call.id))


def test_tool_round_trip_streaming(
    client: anthropic.Anthropic, stack: LocalStack, model: RecordingModel
) -> None:
    _, events = stream_raw(stack, {"model": MODEL, "max_tokens": 200, "tools": [WEATHER_TOOL],
                                   "messages": [{"role": "user", "content": QUESTION}]})
    assert message_start(events)["usage"]["input_tokens"] == tokens(model.prompts[-1])
    blocks = blocks_of(events)
    assert len(blocks) == 2
    assert text_of(blocks[0]) == "Let me check."
    tool = blocks[1]
    assert tool.start["type"] == "tool_use" and tool.start["name"] == "get_weather"
    assert tool.start["input"] == {} and tool.start["id"]
    assert set(tool.start) == {"type", "id", "name", "input"}
    assert tool.deltas and all(d["type"] == "input_json_delta" for d in tool.deltas)
    assert json.loads("".join(d["partial_json"] for d in tool.deltas)) == TOOL_ARGS
    assert message_delta(events)["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert message_delta(events)["usage"]["output_tokens"] == len(TOOL_WORDS)

    with client.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER_TOOL],
                                messages=[{"role": "user", "content": QUESTION}]) as s:
        first = s.get_final_message()
    assert first.stop_reason == "tool_use"
    call = first.content[1]
    assert isinstance(call, ToolUseBlock) and call.input == TOOL_ARGS

    with client.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER_TOOL],
                                messages=follow_up(call.id)) as s:
        second = s.get_final_message()
    assert model.prompts[-1] == expected_follow_up_prompt(call.id)
    assert second.stop_reason == "end_turn"
    assert isinstance(second.content[0], TextBlock)
    assert second.content[0].text == "".join(AFTER_TOOL_WORDS)


def test_tool_choice_none_hides_the_tools(stack: LocalStack, model: RecordingModel) -> None:
    response = post(stack, {"model": MODEL, "max_tokens": 50, "tools": [WEATHER_TOOL],
                            "tool_choice": {"type": "none"},
                            "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    assert model.prompts[-1] == prompt_of("hi")
    assert response.json()["content"] == [{"type": "text", "text": ANSWER}]


# ------------------------------------------------------------------ thinking


def test_thinking_enabled_non_streaming(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=100,
                                   thinking={"type": "enabled", "budget_tokens": 1024},
                                   messages=[{"role": "user", "content": "THINK first"}])
    assert [b.type for b in reply.content] == ["thinking", "text"]
    thinking, text = reply.content
    assert isinstance(thinking, ThinkingBlock) and thinking.thinking == "Pondering deeply"
    assert isinstance(thinking.signature, str)
    assert isinstance(text, TextBlock) and text.text == "Hello there."
    assert reply.usage.output_tokens == len(THINK_WORDS)


def test_thinking_enabled_streaming(client: anthropic.Anthropic, stack: LocalStack) -> None:
    _, events = stream_raw(stack, {"model": MODEL, "max_tokens": 100,
                                   "thinking": {"type": "enabled", "budget_tokens": 1024},
                                   "messages": [{"role": "user", "content": "THINK first"}]})
    blocks = blocks_of(events)
    assert len(blocks) == 2
    thinking = blocks[0]
    assert thinking.start == {"type": "thinking", "thinking": "", "signature": ""}
    kinds = [d["type"] for d in thinking.deltas]
    assert kinds[-1] == "signature_delta" and kinds.count("signature_delta") == 1
    assert set(kinds[:-1]) == {"thinking_delta"}
    assert "".join(d["thinking"] for d in thinking.deltas[:-1]) == "Pondering deeply"
    assert text_of(blocks[1]) == "Hello there."
    assert message_delta(events)["usage"]["output_tokens"] == len(THINK_WORDS)

    with client.messages.stream(model=MODEL, max_tokens=100,
                                thinking={"type": "enabled", "budget_tokens": 1024},
                                messages=[{"role": "user", "content": "THINK first"}]) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert isinstance(final.content[0], ThinkingBlock)
    assert final.content[0].thinking == "Pondering deeply"


def test_adaptive_thinking_gives_thinking_blocks(stack: LocalStack) -> None:
    response = post(stack, {"model": MODEL, "max_tokens": 100, "thinking": {"type": "adaptive"},
                            "messages": [{"role": "user", "content": "THINK first"}]})
    assert [b["type"] for b in response.json()["content"]] == ["thinking", "text"]


def test_no_thinking_requested_means_no_thinking_blocks(
    client: anthropic.Anthropic, stack: LocalStack, model: RecordingModel
) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=100,
                                   messages=[{"role": "user", "content": "THINK first"}])
    assert [b.type for b in reply.content] == ["text"]
    assert isinstance(reply.content[0], TextBlock) and reply.content[0].text == "Hello there."
    assert "<no_think>" not in model.prompts[-1]
    assert reply.usage.output_tokens == len(THINK_WORDS)
    _, events = stream_raw(stack, {"model": MODEL, "max_tokens": 100,
                                   "messages": [{"role": "user", "content": "THINK first"}]})
    blocks = blocks_of(events)
    assert len(blocks) == 1 and text_of(blocks[0]) == "Hello there."
    assert not any("think" in json.dumps(data) for _, data in events[1:])


def test_thinking_disabled_reaches_the_template(
    client: anthropic.Anthropic, model: RecordingModel
) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=100, thinking={"type": "disabled"},
                                   messages=[{"role": "user", "content": "THINK first"}])
    assert model.prompts[-1] == "<user> THINK first <no_think> <assistant>"
    assert reply.usage.input_tokens == 5
    assert [b.type for b in reply.content] == ["text"]


def test_thinking_history_is_accepted(stack: LocalStack, model: RecordingModel) -> None:
    response = post(stack, {"model": MODEL, "max_tokens": 50, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "yo"}]},
        {"role": "user", "content": [{"type": "text", "text": "again"},
                                     {"type": "document", "source": {"type": "text"}}]},
    ]})
    assert response.status_code == 200, response.text
    assert model.prompts[-1] == "<user> hi <assistant> yo <user> again <assistant>"


# ------------------------------------------------------------------ count_tokens


def test_count_tokens_equals_the_jobs_input_tokens(
    client: anthropic.Anthropic, model: RecordingModel
) -> None:
    generations = len(model.generations)
    messages: list[MessageParam] = [{"role": "user", "content": "count me please"}]
    counted = client.messages.count_tokens(model=MODEL, system="Be brief.",
                                           tools=[WEATHER_TOOL], messages=messages)
    assert len(model.generations) == generations, "counting must not generate"
    bare = client.messages.count_tokens(model=MODEL, messages=messages)
    assert bare.input_tokens == tokens(prompt_of("count me please")) == 5
    no_think = client.messages.count_tokens(model=MODEL, messages=messages,
                                            thinking={"type": "disabled"})
    assert no_think.input_tokens == bare.input_tokens + 1
    reply = client.messages.create(model=MODEL, max_tokens=50, system="Be brief.",
                                   tools=[WEATHER_TOOL], messages=messages)
    assert counted.input_tokens == reply.usage.input_tokens == tokens(model.prompts[-1])
    assert counted.input_tokens > bare.input_tokens + 3  # + "<system> Be brief."


def test_count_tokens_raw(stack: LocalStack) -> None:
    response = post(stack, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                    path="/v1/messages/count_tokens")
    assert response.status_code == 200
    assert response.json() == {"input_tokens": 3}
    assert response.headers["request-id"].startswith("req_")


async def test_count_tokens_burst_is_answered_once(
    stack: LocalStack, model: RecordingModel
) -> None:
    text = f"burst {time.monotonic_ns()}"
    async with anthropic.AsyncAnthropic(base_url=stack.base_url, api_key="unused",
                                        max_retries=0) as client:
        counts = await asyncio.gather(*(
            client.messages.count_tokens(model=MODEL, system="S.", tools=[WEATHER_TOOL],
                                         messages=[{"role": "user", "content": text}])
            for _ in range(20)))
    assert {c.input_tokens for c in counts} == {
        tokens(f"<tools> {TOOLS_JSON} <system> S. {prompt_of(text)}")}
    assert sum(text in encoded for encoded in model.encoded) == 1, (
        "identical counts are cached and share one tokenize")


def test_count_tokens_unknown_model(stack: LocalStack) -> None:
    response = post(stack, {"model": "nobody/nothing",
                            "messages": [{"role": "user", "content": "hi"}]},
                    path="/v1/messages/count_tokens")
    assert "nobody/nothing" in assert_error(response, 404, "not_found_error")


# ------------------------------------------------------------------ errors


def test_missing_max_tokens(stack: LocalStack) -> None:
    response = post(stack, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert "max_tokens: Field required" in assert_error(response, 400, "invalid_request_error")


def test_unknown_model_is_404_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="nobody/nothing", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert isinstance(info.value.body, dict)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "not_found_error"
    assert info.value.request_id is not None and info.value.request_id.startswith("req_")
    assert info.value.body["request_id"] == info.value.request_id


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[]", "Expected `object`"),
        (b'{"max_tokens":5,"messages":[{"role":"user","content":"x"}]}', "model: Field required"),
        (b'{"model":"m","max_tokens":5,"messages":[{"role":"wizard","content":"x"}]}', "role"),
        (b'{"model":"m","max_tokens":5,"messages":[]}', "messages"),
        (b'{"model":"m","max_tokens":0,"messages":[{"role":"user","content":"x"}]}',
         "max_tokens"),
    ],
)
def test_bad_bodies_are_400_invalid_request_error(
    stack: LocalStack, content: bytes, fragment: str
) -> None:
    response = httpx.post(f"{stack.base_url}/v1/messages", content=content,
                          headers={"content-type": "application/json"}, timeout=10)
    assert fragment in assert_error(response, 400, "invalid_request_error")


def test_prompt_too_long_has_claude_codes_exact_text(client: anthropic.Anthropic) -> None:
    long = " ".join(["word"] * 300)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=10,
                               messages=[{"role": "user", "content": long}])
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"] == {
        "type": "invalid_request_error",
        "message": f"prompt is too long: {tokens(prompt_of(long))} tokens > {MAX_PROMPT} maximum",
    }


def test_image_content_is_refused_with_400(stack: LocalStack) -> None:
    response = post(stack, {"model": MODEL, "max_tokens": 10, "messages": [{
        "role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}]}]})
    assert "image" in assert_error(response, 400, "invalid_request_error")


def test_wrong_method_and_unknown_path_use_anthropics_shape(stack: LocalStack) -> None:
    wrong = httpx.get(f"{stack.base_url}/v1/messages", timeout=5)
    assert "GET" in assert_error(wrong, 405, "invalid_request_error")
    for method in ("GET", "POST"):
        missing = httpx.request(method, f"{stack.base_url}/v1/messages/nope", json={},
                                timeout=5)
        assert "/v1/messages/nope" in assert_error(missing, 404, "not_found_error")


def test_failure_mid_stream_is_an_error_event_without_message_stop(
    client: anthropic.Anthropic, stack: LocalStack
) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 50,
                            "messages": [{"role": "user", "content": "CRASH now"}]}
    _, events = stream_raw(stack, body)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-1] == "error"
    assert "message_stop" not in names and "message_delta" not in names
    error = events[-1][1]
    assert set(error) == {"type", "error"}
    assert error["error"]["type"] == "api_error"
    assert "the model failed while generating" in error["error"]["message"]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Partial answer"

    with pytest.raises(anthropic.APIStatusError) as info, client.messages.stream(
            model=MODEL, max_tokens=50,
            messages=[{"role": "user", "content": "CRASH now"}]) as s:
        s.get_final_message()
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "api_error"


def test_failure_before_the_answer_is_a_5xx(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.InternalServerError) as info:
        client.messages.create(model=MODEL, max_tokens=50,
                               messages=[{"role": "user", "content": "CRASH now"}])
    assert info.value.status_code == 502
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "api_error"


def test_busy_neuron_is_529_overloaded_with_retry_after(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    model_file = tmp_path / "slow.gguf"
    model_file.write_bytes(b"")
    script = Script(words=tuple(f" w{i}" for i in range(200)), token_delay_s=0.05)
    body = {"model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": "go"}]}
    with LocalStack(nats_url=nats_server.url, root="e2e-anthropic-busy",
                    engine=ScriptedEngine(script), neuron=NeuronSettings(max_jobs=1),
                    models=[ModelSpec(source=str(model_file), served_name=MODEL)]) as busy:
        with httpx.stream("POST", f"{busy.base_url}/v1/messages",
                          json={**body, "stream": True}, timeout=10) as holding:
            assert holding.status_code == 200
            lines = holding.iter_lines()  # kept referenced: a collected iterator closes the stream
            for line in lines:
                if line == "event: content_block_delta":
                    break  # the one slot is taken and generating
            assert busy.worker is not None and busy.worker.jobs_running == 1
            with busy.anthropic_client() as client, pytest.raises(
                    anthropic.OverloadedError) as info:
                client.messages.create(model=MODEL, max_tokens=10,
                                       messages=[{"role": "user", "content": "hi"}])
            refused = post(busy, body)
        assert info.value.status_code == 529
        assert info.value.response.headers["retry-after"] == "1"
        assert isinstance(info.value.body, dict)
        assert info.value.body["error"]["type"] == "overloaded_error"
        assert assert_error(refused, 529, "overloaded_error")
        assert refused.headers["retry-after"] == "1"
        worker = busy.worker
        deadline = time.monotonic() + 3
        while worker.jobs_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.jobs_running == 0, "closing the stream must cancel the job"


# ------------------------------------------------------------------ headers and versions


def test_beta_query_and_beta_header_are_accepted(client: anthropic.Anthropic) -> None:
    reply = client.beta.messages.create(
        model=MODEL, max_tokens=50, betas=["made-up-beta-2099-01-01", "context-1m-2025-08-07"],
        messages=[{"role": "user", "content": "hi"}], metadata={"user_id": "u1"},
    )
    assert reply.content[0].type == "text"
    assert reply.stop_reason == "end_turn"


def test_version_2026_ignores_sampling_parameters(
    stack: LocalStack, model: RecordingModel
) -> None:
    body = {"model": MODEL, "max_tokens": 50, "temperature": 5.0, "top_p": 0, "top_k": -1,
            "messages": [{"role": "user", "content": "hi"}],
            "context_management": {"edits": []}, "output_config": {"effort": "low"}}
    response = post(stack, body, path="/v1/messages?beta=true", headers={
        "anthropic-version": "2026-10-21", "anthropic-beta": "made-up-beta-2099-01-01",
        "x-api-key": "sk-ant-whatever"})
    assert response.status_code == 200, response.text
    assert response.json()["content"] == [{"type": "text", "text": ANSWER}]
    params = model.params[-1]
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 1.0, 0)
    refused = post(stack, body, headers={"anthropic-version": "2023-06-01"})
    assert "temperature" in assert_error(refused, 400, "invalid_request_error")


def test_version_2023_honours_sampling_parameters(
    stack: LocalStack, model: RecordingModel
) -> None:
    response = post(stack, {"model": MODEL, "max_tokens": 50, "temperature": 0.2,
                            "top_p": 0.5, "top_k": 5,
                            "messages": [{"role": "user", "content": "hi"}]},
                    headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 200, response.text
    params = model.params[-1]
    assert (params.temperature, params.top_p, params.top_k) == (0.2, 0.5, 5)


@pytest.mark.parametrize("auth", [{"x-api-key": "k"}, {"authorization": "Bearer t"}, {}])
def test_both_auth_headers_are_accepted(stack: LocalStack, auth: dict[str, str]) -> None:
    response = post(stack, {"model": MODEL, "max_tokens": 50,
                            "messages": [{"role": "user", "content": "hi"}]},
                    headers={"anthropic-version": "2023-06-01", **auth})
    assert response.status_code == 200, response.text


def test_sdk_with_an_auth_token(stack: LocalStack) -> None:
    with anthropic.Anthropic(base_url=stack.base_url, auth_token="token", max_retries=0) as c:
        reply = c.messages.create(model=MODEL, max_tokens=50,
                                  messages=[{"role": "user", "content": "hi"}])
    assert isinstance(reply.content[0], TextBlock) and reply.content[0].text == ANSWER
