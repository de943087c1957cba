"""The OpenAI wire rules, end to end: real SDK and raw HTTP against the gateway, over the real bus,
to a neuron whose model is scripted (so every byte of the answer is known in advance)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cortex.embedded_nats import EmbeddedNatsServer
from neuron.settings import ModelSpec
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = pytest.mark.e2e
MODEL = "test-org/scripted-1.0"
ANSWER = "Hello from the scripted model."


@pytest.fixture(scope="module")
def stack(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    model_file = tmp_path_factory.mktemp("scripted") / "scripted.gguf"
    model_file.write_bytes(b"")
    engine = ScriptedEngine(Script())
    with LocalStack(
        nats_url=nats_server.url, root="e2e-wire", engine=engine,
        models=[ModelSpec(source=str(model_file), served_name=MODEL)],
    ) as running:
        yield running


@pytest.fixture
def client(stack: LocalStack) -> Iterator[openai.OpenAI]:
    with stack.openai_client() as c:
        yield c


def test_non_streaming_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 6)
    assert reply.usage.total_tokens == 9


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1


def test_sse_framing_is_exact(stack: LocalStack) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 3}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body,
                      timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        raw = response.read()
    assert b"\r" not in raw and b"event:" not in raw
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length",
                                          "logprobs": None}
    assert all(p["usage"] is None for p in payloads)  # no usage chunk without include_usage
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads) == (
        "Hello from the"
    )


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nobody/nothing",
                                       messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert "nobody/nothing" in info.value.message


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"", None, "empty"),
        (b"[]", None, "Expected `object`"),
        (b'{"messages":[{"role":"user","content":"x"}]}', "model",
         "missing 'model' field in request body"),
        (b'{"model":"m","messages":"hi"}', "messages", "Expected `array | null`, got `str`"),
        (b'{"model":"m","messages":[{"role":"wizard","content":"x"}]}', "messages[0].role",
         "Invalid enum value 'wizard'"),
        (b'{"model":"m","messages":[]}', "messages", "non-empty"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}',
         "temperature", "Expected `float | null`"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":7}',
         "temperature", "between 0 and 2"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"n":3}', "n", "n=1"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}',
         "max_tokens", "at least 1"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"seed":1208925819614629174706176}',
         "seed", "Expected `int` <= 9223372036854775807"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}', "stream",
         "Expected `bool | null`"),
        (b'{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e",'
         b'"f","g","h","i","j","k","l","m","n","o","p","q"]}', "stop", "1 to 16"),
        (b'\xff\xfe', None, "not valid JSON"),
    ],
)
def test_bad_bodies_get_400_naming_the_parameter(
    stack: LocalStack, body: bytes, param: str | None, fragment: str
) -> None:
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]


def test_unknown_route_and_wrong_method_use_the_error_shape(stack: LocalStack) -> None:
    missing = httpx.get(f"{stack.base_url}/v1/nothing-here", timeout=5)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{stack.base_url}/v1/chat/completions", timeout=5)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_query_strings_are_ignored(client: openai.OpenAI, stack: LocalStack) -> None:
    response = httpx.post(f"{stack.base_url}/v1/chat/completions?beta=true",
                          json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                          timeout=10)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == ANSWER


def test_models_lists_the_resident_model(client: openai.OpenAI, stack: LocalStack) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    raw = httpx.get(f"{stack.base_url}/v1/models", timeout=5).json()
    entry = raw["data"][0]
    assert entry["loaded"] is True
    assert entry["locations"] == [{"node": "n1", "status": "loaded", "vram_estimate_mb": None}]
    assert entry["max_model_len"] == 64
    assert raw["first_id"] == raw["last_id"] == MODEL
    single = httpx.get(f"{stack.base_url}/v1/models/{MODEL}", timeout=5)
    assert single.status_code == 200 and single.json()["id"] == MODEL
    assert httpx.get(f"{stack.base_url}/v1/models/no/such", timeout=5).status_code == 404


def test_health_counts_nodes(stack: LocalStack) -> None:
    for path in ("/health", "/"):
        response = httpx.get(f"{stack.base_url}{path}", timeout=5)
        assert response.json() == {"status": "ok", "nodes": {"healthy": 1, "total": 1},
                                   "bus": "connected"}
    ready = httpx.get(f"{stack.base_url}/ready", timeout=5)
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


def test_disconnect_mid_stream_cancels_the_job_on_the_neuron(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    model_file = tmp_path / "slow.gguf"
    model_file.write_bytes(b"")
    script = Script(words=tuple(f" w{i}" for i in range(200)), token_delay_s=0.05)
    with LocalStack(nats_url=nats_server.url, root="e2e-cancel", engine=ScriptedEngine(script),
                    models=[ModelSpec(source=str(model_file), served_name=MODEL)]) as stack:
        client = stack.openai_client()
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "go"}], stream=True
        )
        for received, _chunk in enumerate(stream, start=1):
            if received == 3:
                break
        stream.close()
        client.close()
        assert stack.worker is not None
        worker = stack.worker
        deadline = time.monotonic() + 3  # the script alone would run for 10 s
        while worker.jobs_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.jobs_running == 0, "the neuron kept generating after the client left"
