"""Property-based fuzzing of both HTTP dialects against a real gateway, a real nats-server and a
neuron running the scripted engine.

Bodies start as valid requests and are then mutated: fields set to values of the wrong type,
deleted or added, numbers beyond every range JSON can write (``1e400``, 30-digit integers), deep
nesting, lone surrogates and NUL as JSON escapes, invalid JSON tokens, other content types, with
streaming on and off. Whatever the body, the gateway must answer:

- never a 5xx;
- every 4xx as valid JSON in the caller's dialect (OpenAI ``{"error": {"message", "type", …}}``,
  Anthropic ``{"type": "error", "error": {"type", "message"}}``);
- every 200 stream as well-formed SSE ending with exactly one terminal event (``[DONE]``;
  ``message_stop`` or ``error``), every 200 body as the dialect's object;
- and stay up (``/health`` after each example), with no job left running at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.embedded_nats import EmbeddedNatsServer
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from tests.support.json_fuzz import (
    JsonValue,
    Raw,
    deep,
    dump,
    json_values,
    mutated,
    scalars,
    small_text,
    text,
)
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

MODEL: Final = "fuzz-org/fuzz-1.0"
EXAMPLES: Final = settings(
    max_examples=120, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------ strategies

#: Tool names: the bus takes 1 to 256 characters (a job it cannot decode is lost on the neuron).
tool_names = small_text | st.sampled_from(["", "n" * 256, "n" * 257, "\x00" * 300])

# Valid requests (mutations make them invalid): mostly what SDKs send, with the odd corner.
max_tokens = st.integers(1, 8)
stream = st.booleans()
content_parts = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text"] * 6 + ["image_url", "input_audio"])},
    optional={"text": text | small_text, "image_url": st.just({"url": "data:image/png;base64,AA"})},
), max_size=3)
openai_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "user", "user", "system", "developer", "tool"]),
     "content": small_text | text | content_parts | st.none()},
    optional={"name": small_text, "tool_call_id": small_text},
)
openai_assistant = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": small_text | st.none()},
    optional={"reasoning_content": small_text,
              "tool_calls": st.lists(st.fixed_dictionaries({
                  "id": small_text, "type": st.just("function"),
                  "function": st.fixed_dictionaries({
                      "name": small_text, "arguments": small_text | st.just({"a": 1})})}),
                  max_size=2)},
)
openai_messages = st.builds(lambda first, rest: [first, *rest], openai_message,
                            st.lists(openai_message | openai_assistant, max_size=3))
openai_tools = st.lists(st.fixed_dictionaries({
    "type": st.just("function"),
    "function": st.fixed_dictionaries({"name": tool_names},
                                      optional={"parameters": st.just({"type": "object"}),
                                                "description": text}),
}), max_size=2)
openai_sampling: Final = {
    "max_tokens": max_tokens, "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50), "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": small_text | st.lists(small_text, min_size=1, max_size=3),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "user": text,
}
chat_bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": openai_messages, "stream": stream},
    optional={**openai_sampling, "max_completion_tokens": max_tokens, "tools": openai_tools,
              "tool_choice": st.sampled_from(["none", "auto", "required"]),
              "chat_template_kwargs": st.dictionaries(small_text, scalars, max_size=2),
              "parallel_tool_calls": st.booleans()},
)
completion_bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": small_text | text | st.lists(small_text, min_size=1,
                                                                     max_size=1),
     "stream": stream},
    optional={**openai_sampling, "echo": st.just(False), "suffix": st.none(),
              "logprobs": st.none(), "best_of": st.just(1)},
)
anthropic_block = st.fixed_dictionaries(
    {"type": st.sampled_from(["text"] * 5 + ["tool_use", "tool_result", "thinking",
                                             "redacted_thinking", "document", "image"])},
    optional={"text": small_text | text, "id": small_text, "name": small_text,
              "input": st.dictionaries(small_text, scalars, max_size=2),
              "tool_use_id": small_text, "content": small_text | st.lists(st.fixed_dictionaries(
                  {"type": st.sampled_from(["text", "image"]), "text": small_text}), max_size=2),
              "is_error": st.booleans(), "thinking": small_text, "signature": small_text,
              "cache_control": st.just({"type": "ephemeral"})},
)
anthropic_message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "user", "assistant"]),
    "content": small_text | text | st.lists(anthropic_block, max_size=3),
})
anthropic_messages = st.builds(
    lambda first, rest: [first, *rest],
    st.fixed_dictionaries({"role": st.just("user"), "content": small_text | text}),
    st.lists(anthropic_message, max_size=3))
anthropic_tools = st.lists(st.fixed_dictionaries(
    {"name": tool_names},
    optional={"description": text, "input_schema": st.just({"type": "object"}),
              "type": st.sampled_from(["custom", "web_search_20250305", "bash_20250124"])},
) | st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": tool_names}, optional={"parameters": st.just({"type": "object"})})}), max_size=2)
message_bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL), "max_tokens": max_tokens, "messages": anthropic_messages,
     "stream": stream},
    optional={"system": small_text | st.lists(st.fixed_dictionaries(
                  {"type": st.just("text"), "text": small_text}), max_size=2),
              "stop_sequences": st.lists(small_text, max_size=3),
              "temperature": st.floats(0, 1), "top_p": st.floats(0.01, 1),
              "top_k": st.integers(0, 50), "tools": anthropic_tools,
              "tool_choice": st.fixed_dictionaries(
                  {"type": st.sampled_from(["auto", "any", "none"])}),
              "thinking": st.fixed_dictionaries(
                  {"type": st.sampled_from(["enabled", "disabled", "adaptive"])},
                  optional={"budget_tokens": st.integers(1024, 4096)}),
              "metadata": st.dictionaries(small_text, scalars, max_size=2)},
)


@st.composite
def bodies(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, JsonValue]]) -> bytes:
    """A request body: valid, or a valid one changed up to three times, or no JSON object."""
    body: JsonValue = draw(valid)
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 1, 1, 2, 3]))):
        body = draw(mutated(body))
    if draw(st.integers(0, 19)) == 0:
        body = draw(json_values)  # not an object at all
    raw = dump(body).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 24)) == 0:
        raw = draw(st.sampled_from([b"", b" ", b"{", raw[: len(raw) // 2], raw + b"x",
                                    b"\xff\xfe" + raw, raw.replace(b'"', b"'", 1)]))
    return raw


CONTENT_TYPES: Final = ["application/json"] * 12 + [
    "application/json; charset=utf-8", "Application/JSON", "application/json;charset=latin-1",
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/jsonx", "", "application/json, text/plain",
]
content_types = st.sampled_from(CONTENT_TYPES)


# ------------------------------------------------------------------ the gateway


@pytest.fixture(scope="module")
def stack(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    model = Path(tmp_path_factory.mktemp("fuzz")) / "model.gguf"
    model.write_bytes(b"")
    script = Script(context_length=4096)
    with LocalStack(nats_url=nats_server.url, root="faults-fuzz-dialects",
                    engine=ScriptedEngine(script), neuron=NeuronSettings(max_jobs=4),
                    # a job lost on the way is a 504 within seconds, not 30 s
                    gateway=GatewaySettings(accept_timeout_s=3.0, replica_accept_timeout_s=1.0),
                    models=[ModelSpec(source=str(model), served_name=MODEL)]) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=15) as http:
        yield http


def assert_no_job_left(stack: LocalStack) -> None:
    assert stack.bus is not None and stack.worker is not None
    deadline = time.monotonic() + 5.0
    while stack.bus.running_on("n1") or stack.worker.heartbeat().jobs_running:
        assert time.monotonic() < deadline, "a job is still running after the fuzzing"
        time.sleep(0.05)


# ------------------------------------------------------------------ the properties


def sse_events(raw: bytes) -> list[dict[str, str]]:
    """Parse an event stream strictly: events separated by a blank line, each line a comment
    (``:``), ``event:`` or ``data:``; the stream ends with the blank line of its last event."""
    text_ = raw.decode("utf-8")
    assert text_.endswith("\n\n"), f"the stream does not end with a complete event: {raw[-80:]!r}"
    events: list[dict[str, str]] = []
    for block in text_[:-2].split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            name, sep, value = line.partition(": ")
            assert sep and name in ("event", "data") and name not in fields, f"bad line {line!r}"
            fields[name] = value
        if fields:
            events.append(fields)
    return events


def check_openai_error(body: JsonValue) -> None:
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "param" in error and "code" in error


def check_anthropic_error(body: JsonValue) -> None:
    assert body["type"] == "error"
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def check_openai_stream(raw: bytes) -> None:
    events = sse_events(raw)
    data = [e["data"] for e in events]
    assert all("event" not in e for e in events)
    assert data.count("[DONE]") == 1 and data[-1] == "[DONE]", data[-3:]
    chunks = [json.loads(d) for d in data[:-1]]
    for chunk in chunks[:-1]:
        assert "error" not in chunk, "an error event must be the last one before [DONE]"
    if chunks and "error" in chunks[-1]:
        check_openai_error(chunks[-1])


def check_anthropic_stream(raw: bytes) -> None:
    events = sse_events(raw)
    names = [e["event"] for e in events]
    for event in events:
        assert json.loads(event["data"])["type"] == event["event"]
    terminal = [n for n in names if n in ("message_stop", "error")]
    assert len(terminal) == 1 and names[-1] == terminal[0], names
    if names[-1] == "error":
        check_anthropic_error(json.loads(events[-1]["data"]))
    else:
        assert names[0] == "message_start"


Check = Callable[[JsonValue], None]


def post(client: httpx.Client, path: str, body: bytes, content_type: str) -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    with client.stream("POST", path, content=body, headers=headers) as response:
        response.read()
    return response


def check_answer(response: httpx.Response, *, anthropic: bool, ok_object: Check) -> None:
    status = response.status_code
    assert status < 500, f"{status}: {response.content[:500]!r}"
    media_type = response.headers.get("content-type", "").split(";")[0]
    if status >= 400:
        assert media_type == "application/json", media_type
        body = response.json()
        (check_anthropic_error if anthropic else check_openai_error)(body)
        return
    assert status == 200, status
    if media_type == "text/event-stream":
        (check_anthropic_stream if anthropic else check_openai_stream)(response.content)
    else:
        assert media_type == "application/json", media_type
        ok_object(response.json())


def still_up(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text


def chat_object(body: JsonValue) -> None:
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"]


def text_object(body: JsonValue) -> None:
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)


def message_object(body: JsonValue) -> None:
    assert body["type"] == "message" and body["role"] == "assistant"


def count_object(body: JsonValue) -> None:
    assert isinstance(body["input_tokens"], int) and body["input_tokens"] >= 0


@EXAMPLES
@given(body=bodies(chat_bodies), content_type=content_types)
def test_chat_completions_survive_any_body(
    client: httpx.Client, body: bytes, content_type: str
) -> None:
    response = post(client, "/v1/chat/completions", body, content_type)
    check_answer(response, anthropic=False, ok_object=chat_object)
    still_up(client)


@EXAMPLES
@given(body=bodies(completion_bodies), content_type=content_types)
def test_completions_survive_any_body(
    client: httpx.Client, body: bytes, content_type: str
) -> None:
    response = post(client, "/v1/completions", body, content_type)
    check_answer(response, anthropic=False, ok_object=text_object)
    still_up(client)


@EXAMPLES
@given(body=bodies(message_bodies), content_type=content_types)
def test_messages_survive_any_body(client: httpx.Client, body: bytes, content_type: str) -> None:
    response = post(client, "/v1/messages", body, content_type)
    check_answer(response, anthropic=True, ok_object=message_object)
    still_up(client)


@EXAMPLES
@given(body=bodies(message_bodies), content_type=content_types)
def test_count_tokens_survives_any_body(
    client: httpx.Client, body: bytes, content_type: str
) -> None:
    response = post(client, "/v1/messages/count_tokens", body, content_type)
    assert "text/event-stream" not in response.headers.get("content-type", "")
    check_answer(response, anthropic=True, ok_object=count_object)
    still_up(client)


FREE_FORM: Final[dict[str, tuple[str, Callable[[Raw], JsonValue]]]] = {
    "openai tool parameters": ("/v1/chat/completions", lambda d: {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": d}}}]}),
    "openai tool call arguments": ("/v1/chat/completions", lambda d: {
        "model": MODEL, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": d}}}]},
        ]}),
    "anthropic tool input": ("/v1/messages", lambda d: {
        "model": MODEL, "max_tokens": 5, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "f",
                                               "input": d}]}]}),
    "anthropic input schema": ("/v1/messages", lambda d: {
        "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "f", "input_schema": {"a": d}}]}),
    "anthropic count_tokens schema": ("/v1/messages/count_tokens", lambda d: {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "f", "input_schema": {"a": d}}]}),
}


@pytest.mark.parametrize("depth", [120, 129, 965, 972, 990])
@pytest.mark.parametrize("where", sorted(FREE_FORM))
def test_deep_nesting_in_free_form_fields_is_a_400_not_a_500(
    client: httpx.Client, where: str, depth: int
) -> None:
    """Found by the fuzzing: nesting the decoder accepts (~970 deep) in a tool's schema broke the
    bus encoder further down the stack (a 500). Bodies nested past 128 are now a 400."""
    path, build = FREE_FORM[where]
    response = post(client, path, dump(build(deep(depth, "list"))).encode(), "application/json")
    check_answer(response, anthropic=path.startswith("/v1/messages"),
                 ok_object=lambda body: None)
    assert response.status_code == (200 if depth < 128 else 400), response.text[:300]
    if depth > 128:
        assert "nested too deeply" in response.text


@pytest.mark.parametrize("name", ["", "n" * 257])
@pytest.mark.parametrize("where", ["openai", "anthropic", "anthropic function", "count_tokens"])
def test_tool_names_the_bus_refuses_are_a_400_not_a_lost_job(
    client: httpx.Client, where: str, name: str
) -> None:
    """Found by the fuzzing: a tool name the bus schema refuses (1 to 256 characters) made the
    neuron drop the undecodable job, and the client waited for a 504."""
    hi = [{"role": "user", "content": "hi"}]
    path, body = {
        "openai": ("/v1/chat/completions", {"model": MODEL, "messages": hi, "tools": [
            {"type": "function", "function": {"name": name}}]}),
        "anthropic": ("/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": hi,
                                       "tools": [{"name": name}]}),
        "anthropic function": ("/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": hi,
                                                "tools": [{"type": "function",
                                                           "function": {"name": name}}]}),
        "count_tokens": ("/v1/messages/count_tokens", {"model": MODEL, "messages": hi,
                                                       "tools": [{"name": name}]}),
    }[where]
    response = post(client, path, dump(body).encode(), "application/json")
    assert response.status_code == 400, response.text[:300]
    check_answer(response, anthropic=where != "openai", ok_object=lambda body: None)
    assert "name" in response.text


def test_valid_requests_still_succeed_after_the_fuzzing(
    stack: LocalStack, client: httpx.Client
) -> None:
    """Runs last in this module: the fuzzing left the gateway and the neuron serving."""
    with stack.openai_client() as openai_client:
        reply = openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello from the scripted model."
    assert_no_job_left(stack)
