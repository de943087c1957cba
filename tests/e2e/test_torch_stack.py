"""The real engine through the whole stack: a tiny random-weight llama (served twice, from its
safetensors folder and from its GGUF) on the torch engine, driven with the OpenAI SDK. Greedy output
through the gateway must equal the engine's own output byte for byte."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import httpx
import nats
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from cortex.embedded_nats import EmbeddedNatsServer
from neuron.engines.base import Finish, GenerationParams, Step
from neuron.engines.torch_engine import TorchEngine
from neuron.settings import ModelSpec
from tests.support.nats_sync import confirm_subscriptions
from tests.support.stack import LocalStack
from tests.support.tiny_models import TinyModel

pytestmark = pytest.mark.e2e
FOLDER_ID = "tiny/llama"
GGUF_ID = "tiny/llama-GGUF"
ROOT = "e2e-torch"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
NO_PENALTY = {"repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def stack(nats_server: EmbeddedNatsServer, tiny_model: TinyModel) -> Iterator[LocalStack]:
    with LocalStack(
        nats_url=nats_server.url, root=ROOT, engine=TorchEngine(device="cpu"),
        models=[ModelSpec(source=str(tiny_model.folder), served_name=FOLDER_ID),
                ModelSpec(source=str(tiny_model.gguf_path), served_name=GGUF_ID)],
    ) as running:
        yield running


@pytest.fixture
def client(stack: LocalStack) -> Iterator[openai.OpenAI]:
    with stack.openai_client() as c:
        yield c


@pytest.fixture(scope="module")
def direct_answer(tiny_model: TinyModel) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) from the engine itself, same request."""
    model = TorchEngine(device="cpu").load(tiny_model.safetensors_files(), lambda f, m: None)
    ids = model.encode(model.render_chat([dict(m) for m in MESSAGES]))
    parts: list[str] = []
    finish: Finish | None = None
    for item in model.generate(ids, GenerationParams(max_tokens=24, temperature=0.0),
                               threading.Event()):
        if isinstance(item, Step):
            parts.append(item.text)
        else:
            finish = item
            parts.append(item.text)
    model.close()
    assert finish is not None
    return "".join(parts), len(ids), finish.completion_tokens


def test_greedy_answer_through_the_gateway_equals_the_engine(
    client: openai.OpenAI, direct_answer: tuple[str, int, int]
) -> None:
    text, prompt_tokens, completion_tokens = direct_answer
    reply = client.chat.completions.create(model=FOLDER_ID, messages=MESSAGES, temperature=0,
                                           max_tokens=24, extra_body=NO_PENALTY)
    assert reply.choices[0].message.content == text
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == completion_tokens


def test_streaming_gives_the_same_text_as_non_streaming(
    client: openai.OpenAI, direct_answer: tuple[str, int, int]
) -> None:
    stream = client.chat.completions.create(
        model=FOLDER_ID, messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        temperature=0, max_tokens=24, extra_body=NO_PENALTY,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct_answer[0]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == direct_answer[2]


def test_gguf_and_safetensors_of_the_same_weights_answer_alike(
    client: openai.OpenAI, direct_answer: tuple[str, int, int]
) -> None:
    reply = client.chat.completions.create(model=GGUF_ID, messages=MESSAGES, temperature=0,
                                           max_tokens=24, extra_body=NO_PENALTY)
    assert reply.choices[0].message.content == direct_answer[0]


def test_max_tokens_cuts_with_finish_reason_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=FOLDER_ID, messages=MESSAGES, temperature=0, max_tokens=3,
        extra_body=NO_PENALTY,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_stop_string_cuts_before_the_match(
    client: openai.OpenAI, direct_answer: tuple[str, int, int]
) -> None:
    text = direct_answer[0]
    assert len(text) > 6, "the tiny model's greedy answer is too short to cut"
    stop = text[4:7]
    reply = client.chat.completions.create(model=FOLDER_ID, messages=MESSAGES, stop=[stop],
                                           temperature=0, max_tokens=24, extra_body=NO_PENALTY)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    answers = {
        client.chat.completions.create(model=FOLDER_ID, messages=MESSAGES, temperature=1.0,
                                       seed=7, max_tokens=16).choices[0].message.content
        for _ in range(2)
    }
    assert len(answers) == 1


def test_prompt_longer_than_the_context_is_400_context_length_exceeded(
    client: openai.OpenAI, tiny_model: TinyModel
) -> None:
    long_prompt = "the neuron loads models " * 200
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=FOLDER_ID,
                                       messages=[{"role": "user", "content": long_prompt}])
    assert info.value.code == "context_length_exceeded"
    limit = tiny_model.context_length - 1
    message = info.value.body["message"]  # type: ignore[index]
    assert message.startswith(
        f"This model's maximum context length is {limit} tokens. However, your messages "
        "resulted in "
    )
    assert message.endswith(" tokens. Please reduce the length of the messages.")


def test_bus_traffic_is_readable_to_a_plain_subscriber(
    stack: LocalStack, nats_server: EmbeddedNatsServer
) -> None:
    """What `nats sub 'cortex.>'` shows: JSON jobs with the real model id, heartbeats."""

    async def watch() -> list[tuple[str, dict[str, object], dict[str, str]]]:
        nc = await nats.connect(nats_server.url)
        sub = await nc.subscribe(f"{ROOT}.>")
        await confirm_subscriptions(nc)
        response = await asyncio.to_thread(
            httpx.post, f"{stack.base_url}/v1/chat/completions",
            json={"model": GGUF_ID, "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 2}, timeout=30,
        )
        assert response.status_code == 200
        seen: list[tuple[str, dict[str, object], dict[str, str]]] = []
        async with asyncio.timeout(5):
            while not {"job", "heartbeat"} <= {str(p["kind"]) for _, p, _ in seen}:
                msg = await sub.next_msg(timeout=3)
                seen.append((msg.subject, json.loads(msg.data), dict(msg.headers or {})))
        await nc.close()
        return seen

    seen = asyncio.run(watch())
    subject, job, headers = next(s for s in seen if s[1]["kind"] == "job")
    assert subject == f"{ROOT}.node.n1.job.tiny_2Fllama-GGUF"  # directed to the replica
    assert job["model"] == GGUF_ID
    assert job["messages"] == [{"role": "user", "content": "hi"}]
    assert headers["Cortex-Model"] == GGUF_ID and headers["Job-Id"] == job["job_id"]
    beat = next(p for s, p, _ in seen if p["kind"] == "heartbeat")
    assert {m["id"] for m in beat["models"]} == {FOLDER_ID, GGUF_ID}  # type: ignore[attr-defined]
