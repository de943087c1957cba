"""Tool calls, reasoning and legacy completions through the OpenAI SDK, end to end.

The scripted model emits the exact text a Qwen-style model would (``<think>`` blocks,
``<tool_call>`` JSON, markers split across tokens); the neuron's output router turns it into typed
deltas and the gateway renders them in OpenAI's shapes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from cortex.embedded_nats import EmbeddedNatsServer
from neuron.settings import ModelSpec
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = pytest.mark.e2e
MODEL = "test-org/tools-1.0"
WEATHER: list[ChatCompletionToolParam] = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]
#: The tool call, split across tokens the way a BPE model would (markers included).
CALL_WORDS = ("Let me", " check.", "<tool", "_call>", '{"name": "get_', 'weather", "argu',
              'ments": {"city": "Par', 'is"}}', "</tool_", "call>")
THINK_WORDS = ("<th", "ink>", "The user", " greets.", "</thi", "nk>", "\n\n", "Hello", "!")
ANSWER_WORDS = ("It is", " sunny", " in Paris.")


def reply(prompt: str) -> Sequence[str]:
    """Answer a tool result with text, a question about weather with a tool call."""
    if "<tool>" in prompt:
        return ANSWER_WORDS
    if "weather" in prompt:
        return CALL_WORDS
    if "think" in prompt:
        return THINK_WORDS
    return ("<think>", "hidden", "</think>", "Plain", " text.")


@pytest.fixture(scope="module")
def engine() -> ScriptedEngine:
    return ScriptedEngine(Script(reply=reply, context_length=512))


@pytest.fixture(scope="module")
def stack(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory,
    engine: ScriptedEngine,
) -> Iterator[LocalStack]:
    model_file = tmp_path_factory.mktemp("tools") / "tools.gguf"
    model_file.write_bytes(b"")
    with LocalStack(
        nats_url=nats_server.url, root="e2e-openai-tools", engine=engine,
        models=[ModelSpec(source=str(model_file), served_name=MODEL)],
    ) as running:
        yield running


@pytest.fixture
def client(stack: LocalStack) -> Iterator[openai.OpenAI]:
    with stack.openai_client() as c:
        yield c


def weather_question() -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_call_round_trip_non_streaming(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    first = client.chat.completions.create(model=MODEL, messages=weather_question(),
                                           tools=WEATHER)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    # the tools reached the template
    assert '"name": "get_weather"' in engine.loaded[0].prompts[-1]

    history: list[ChatCompletionMessageParam] = [
        *weather_question(),
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call.id, "type": "function",
            "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=WEATHER)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].message.tool_calls is None
    prompt = engine.loaded[0].prompts[-1]
    assert "<tool> sunny, 21 C" in prompt
    assert '"arguments": {"city": "Paris"}' in prompt  # JSON arguments became an object


def test_tool_call_streaming_deltas(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=weather_question(),
                                                 tools=WEATHER, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    tool_deltas = [t for d in deltas for t in d.tool_calls or ()]
    assert tool_deltas[0].id and tool_deltas[0].function is not None
    assert tool_deltas[0].function.name == "get_weather"
    assert all(t.id is None and (t.function is None or t.function.name is None)
               for t in tool_deltas[1:]), "id and name only in the first delta of a call"
    arguments = "".join(t.function.arguments or "" for t in tool_deltas if t.function)
    assert json.loads(arguments) == {"city": "Paris"}
    assert all(t.index == 0 for t in tool_deltas)
    content = "".join(d.content or "" for d in deltas)
    assert content == "Let me check."
    assert "<tool" not in content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls" and all(f is None for f in finishes[:-1])


def test_sdk_accumulates_a_streamed_tool_call(stack: LocalStack) -> None:
    with stack.openai_client() as c, c.chat.completions.stream(
        model=MODEL, messages=weather_question(), tools=WEATHER
    ) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.tool_calls is not None
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_tool_choice_none_hides_the_tools(client: openai.OpenAI, engine: ScriptedEngine) -> None:
    client.chat.completions.create(model=MODEL, messages=weather_question(), tools=WEATHER,
                                   tool_choice="none", max_tokens=2)
    assert "<tools>" not in engine.loaded[0].prompts[-1]


def test_reasoning_is_split_out_streaming_and_not(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "think, then hi"}]
    reply_ = client.chat.completions.create(model=MODEL, messages=messages)
    message = reply_.choices[0].message
    assert message.content == "Hello!"
    assert getattr(message, "reasoning_content", None) == "The user greets."

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == "The user greets."
    assert content == "Hello!"


def test_reasoning_history_from_zed_is_accepted(client: openai.OpenAI,
                                                engine: ScriptedEngine) -> None:
    body = {"model": MODEL, "max_tokens": 3, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
        {"role": "user", "content": "again"}]}
    response = client.post("/chat/completions", body=body, cast_to=httpx.Response)
    assert response.status_code == 200
    assert "<assistant> Hello!" in engine.loaded[0].prompts[-1]


def test_legacy_completions_non_streaming_and_streaming(client: openai.OpenAI,
                                                        engine: ScriptedEngine) -> None:
    done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert done.object == "text_completion"
    # raw prompts are not routed: markers stay in the text
    assert done.choices[0].text == "<think>hidden</think>Plain text."
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.prompt_tokens == 4
    assert engine.loaded[0].prompts[-1] == "Once upon a time"  # no chat template

    chunks = list(client.completions.create(model=MODEL, prompt=["Once upon a time"],
                                            max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "<think>hidden"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"suffix": "end"}, "suffix", "unsupported_parameter"),
        ({"echo": True}, "echo", "unsupported_parameter"),
        ({"prompt": ["a", "b"]}, "prompt", None),
        ({"prompt": ""}, "prompt", None),
    ],
)
def test_legacy_completion_refusals(client: openai.OpenAI, extra: dict[str, object],
                                    param: str, code: str | None) -> None:
    body = {"model": MODEL, "prompt": "x", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/completions", body=body, cast_to=httpx.Response)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == param
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"


def test_malformed_tool_json_from_the_model_stays_text(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model_file = tmp_path_factory.mktemp("bad-tool") / "bad.gguf"
    model_file.write_bytes(b"")
    words = ("<tool_call>", "{not json", "</tool_call>")
    with LocalStack(
        nats_url=nats_server.url, root="e2e-bad-tool", engine=ScriptedEngine(Script(words=words)),
        models=[ModelSpec(source=str(model_file), served_name=MODEL)],
    ) as stack, stack.openai_client() as c:
        done = c.chat.completions.create(model=MODEL, messages=weather_question(),
                                         tools=WEATHER)
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.content == "<tool_call>{not json</tool_call>"
    assert done.choices[0].message.tool_calls is None
    assert any("tool call" in r.getMessage() for r in caplog.records)


def test_without_tools_the_models_tool_markup_stays_content(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(model=MODEL, messages=weather_question())
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.tool_calls is None
    assert done.choices[0].message.content == "".join(CALL_WORDS)
