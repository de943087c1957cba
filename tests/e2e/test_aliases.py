"""Aliases end to end: Claude Code's model names reach a local model through a glob alias, exact
aliases show in /v1/models, and responses name the model the client asked for."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from cortex.catalogue import Aliases, Catalogue
from cortex.embedded_nats import EmbeddedNatsServer
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = pytest.mark.e2e
MODEL = "test-org/local-1.0"
ANSWER = "Hello from the scripted model."


@pytest.fixture(scope="module")
def stack(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    model_file = tmp_path_factory.mktemp("aliases") / "m.gguf"
    model_file.write_bytes(b"")
    aliases = Aliases.of({"helexa/small": MODEL, "claude-*": MODEL})
    with LocalStack(
        nats_url=nats_server.url, root="e2e-aliases", engine=ScriptedEngine(Script()),
        models=[ModelSpec(source=str(model_file), served_name=MODEL)],
        gateway=GatewaySettings(catalogue=Catalogue(aliases=aliases)),
    ) as running:
        yield running


def test_claude_codes_model_names_reach_the_local_model(stack: LocalStack) -> None:
    with stack.anthropic_client() as client:
        reply = client.messages.create(model="claude-sonnet-4-6", max_tokens=16,
                                       messages=[{"role": "user", "content": "hi"}])
        counted = client.messages.count_tokens(model="claude-haiku-4-5",
                                               messages=[{"role": "user", "content": "hi"}])
        with client.messages.stream(model="claude-opus-4-1", max_tokens=16,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            streamed = stream.get_final_message()
    assert reply.model == "claude-sonnet-4-6"
    assert reply.content[0].type == "text" and reply.content[0].text == ANSWER
    assert counted.input_tokens == reply.usage.input_tokens
    assert streamed.model == "claude-opus-4-1"


def test_an_exact_alias_works_in_openai_and_shows_in_models(stack: LocalStack) -> None:
    with stack.openai_client() as client:
        done = client.chat.completions.create(model="helexa/small",
                                              messages=[{"role": "user", "content": "hi"}])
        ids = [m.id for m in client.models.list()]
    assert done.model == "helexa/small"
    assert done.choices[0].message.content == ANSWER
    assert ids == sorted([MODEL, "helexa/small"])  # sorted by id; globs cannot be listed
    card = httpx.get(f"{stack.base_url}/v1/models/helexa/small", timeout=5).json()
    assert card["id"] == "helexa/small" and card["loaded"] is True
    assert httpx.get(f"{stack.base_url}/v1/models/claude-x", timeout=5).json()["id"] == "claude-x"


def test_an_unaliased_unknown_model_is_still_404(stack: LocalStack) -> None:
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=5,
                          json={"model": "other/model",
                                "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
