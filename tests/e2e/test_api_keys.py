"""API keys end to end: the real OpenAI and Anthropic SDKs (and raw HTTP) against a gateway with
keys, over the real bus, to a scripted neuron. Missing and wrong keys, both headers, a key's model
allow-list (inference, token counts, /v1/models, /admin), its limit on requests in flight (held by
a stream until it ends or the client leaves, never leaked by an error), the open routes, the
operator client, and logs that never show a key."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from cortex.auth import ApiKey
from cortex.catalogue import Catalogue
from cortex.config import ModelsConfig
from cortex.embedded_nats import EmbeddedNatsServer
from cortex.operator import OperatorClient, OperatorError
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = pytest.mark.e2e

MODEL_A = "test-org/keys-a"
MODEL_B = "test-org/keys-b"
FULL = "full-access-key-0123456789"
LIMITED = "limited-key-abcdefghijklmnop"
WRONG = "wrong-key-zyxwvutsrqponmlkji"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
HOLD: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hold"}]
"""A prompt the scripted model answers with 400 tokens, 50 ms apart: a stream held ~20 s."""
FREED_WITHIN_S = 5.0
"""A released slot is usable again well within this; a stream left open holds it far longer."""
AN_HI: list[MessageParam] = [{"role": "user", "content": "hi"}]


def _reply(prompt: str) -> Sequence[str]:
    if "hold" in prompt:
        return [f" w{i}" for i in range(400)]
    return ["Hello", " there", "."]


@pytest.fixture(scope="module")
def stack(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    folder = tmp_path_factory.mktemp("keys")
    models = []
    for name in (MODEL_A, MODEL_B):
        path = folder / f"{name.rsplit('/', 1)[1]}.gguf"
        path.write_bytes(b"")
        models.append(ModelSpec(source=str(path), served_name=name))
    keys = (
        ApiKey(key=FULL, name="ops"),
        ApiKey(key=LIMITED, name="app", models=("test-org/keys-a*",), max_concurrent=1),
    )
    catalogue = Catalogue.of(ModelsConfig(aliases={"fast": MODEL_A, "big": MODEL_B}))
    with LocalStack(
        nats_url=nats_server.url, root="e2e-api-keys",
        engine=ScriptedEngine(Script(reply=_reply, token_delay_s=0.05)), models=models,
        neuron=NeuronSettings(max_jobs=8),
        gateway=GatewaySettings(api_keys=keys, catalogue=catalogue),
    ) as running:
        yield running


def oa(stack: LocalStack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def an(stack: LocalStack, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, api_key=key, max_retries=0)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_until_free(stack: LocalStack, key: str) -> None:
    """Poll until ``key`` may start a request again (its slot is released once the gateway has
    finished the response, a moment after the client saw its end); bounded."""
    deadline = time.monotonic() + FREED_WITHIN_S
    while True:
        response = httpx.get(f"{stack.base_url}/v1/models", headers=bearer(key), timeout=5)
        if response.status_code == 200:
            return
        assert response.status_code == 429, response.text
        assert time.monotonic() < deadline, "the key's slot was never released"
        time.sleep(0.02)


def assert_at_limit(stack: LocalStack, key: str) -> None:
    """Another request with ``key`` gets 429 in each dialect, with retry-after."""
    with oa(stack, key) as client, pytest.raises(openai.RateLimitError) as oa_info:
        client.chat.completions.create(model=MODEL_A, messages=HI)
    assert oa_info.value.response.headers["retry-after"] == "1"
    body = oa_info.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    with an(stack, key) as client, pytest.raises(anthropic.RateLimitError) as an_info:
        client.messages.create(model=MODEL_A, max_tokens=8, messages=AN_HI)
    assert an_info.value.status_code == 429
    assert an_info.value.response.headers["retry-after"] == "1"
    an_body = an_info.value.body
    assert isinstance(an_body, dict) and an_body["error"]["type"] == "rate_limit_error"


# ------------------------------------------------------------------ authentication


def test_a_missing_key_is_401_in_each_dialect(stack: LocalStack) -> None:
    chat = httpx.post(f"{stack.base_url}/v1/chat/completions",
                      json={"model": MODEL_A, "messages": HI}, timeout=5)
    assert chat.status_code == 401
    assert chat.json()["error"]["type"] == "authentication_error"
    assert chat.json()["error"]["code"] == "invalid_api_key"
    messages = httpx.post(f"{stack.base_url}/v1/messages",
                          json={"model": MODEL_A, "max_tokens": 8, "messages": HI}, timeout=5)
    assert messages.status_code == 401
    assert messages.json()["type"] == "error"
    assert messages.json()["error"]["type"] == "authentication_error"
    assert "request-id" in messages.headers
    count = httpx.post(f"{stack.base_url}/v1/messages/count_tokens",
                       json={"model": MODEL_A, "messages": HI}, timeout=5)
    assert (count.status_code, count.json()["error"]["type"]) == (401, "authentication_error")
    for path in ("/v1/models", f"/v1/models/{MODEL_A}"):
        response = httpx.get(f"{stack.base_url}{path}", timeout=5)
        assert (response.status_code, response.json()["error"]["code"]) == (401,
                                                                            "invalid_api_key")


def test_a_wrong_key_is_401_for_each_sdk_and_never_echoed(stack: LocalStack) -> None:
    with oa(stack, WRONG) as client, pytest.raises(openai.AuthenticationError) as oa_info:
        client.chat.completions.create(model=MODEL_A, messages=HI)
    assert WRONG not in oa_info.value.response.text
    with an(stack, WRONG) as client, pytest.raises(anthropic.AuthenticationError) as an_info:
        client.messages.create(model=MODEL_A, max_tokens=8, messages=AN_HI)
    assert WRONG not in an_info.value.response.text
    body = an_info.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "authentication_error"
    # a configured key's prefix or a key with extra characters is just as wrong
    for near in (FULL[:-1], FULL + "x", FULL.upper()):
        response = httpx.get(f"{stack.base_url}/v1/models", headers=bearer(near), timeout=5)
        assert response.status_code == 401


def test_bearer_and_x_api_key_both_work(stack: LocalStack,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with oa(stack, FULL) as client:  # Authorization: Bearer
        reply = client.chat.completions.create(model=MODEL_A, messages=HI)
    assert reply.choices[0].message.content == "Hello there."
    with an(stack, FULL) as client:  # SDK 2.x: Authorization: Bearer
        message = client.messages.create(model=MODEL_B, max_tokens=8,
                                         messages=AN_HI)
    assert message.content[0].type == "text" and message.content[0].text == "Hello there."
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with anthropic.Anthropic(base_url=stack.base_url, api_key=None, max_retries=0,
                             default_headers={"x-api-key": FULL}) as client:
        sent = client.messages.with_raw_response.create(
            model=MODEL_A, max_tokens=8, messages=AN_HI)
    assert "authorization" not in sent.http_request.headers
    assert sent.parse().content[0].type == "text"
    raw = httpx.post(f"{stack.base_url}/v1/chat/completions", headers={"x-api-key": FULL},
                     json={"model": MODEL_A, "messages": HI}, timeout=5)
    assert raw.status_code == 200
    # a wrong bearer beside a right x-api-key (Claude Code may send both): the right one counts
    both = httpx.get(f"{stack.base_url}/v1/models",
                     headers={**bearer(WRONG), "x-api-key": FULL}, timeout=5)
    assert both.status_code == 200


def test_health_and_ready_are_open_and_admin_is_not(stack: LocalStack) -> None:
    for path in ("/health", "/", "/ready"):
        assert httpx.get(f"{stack.base_url}{path}", timeout=5).status_code == 200
    fleet = httpx.get(f"{stack.base_url}/admin/fleet", timeout=5)
    assert fleet.status_code == 401
    assert fleet.json()["error"]["type"] == "authentication_error"
    load = httpx.post(f"{stack.base_url}/admin/models/load", json={"model": MODEL_A}, timeout=5)
    assert load.status_code == 401
    allowed = httpx.get(f"{stack.base_url}/admin/fleet", headers=bearer(FULL), timeout=5)
    assert allowed.status_code == 200
    assert [n["name"] for n in allowed.json()["nodes"]] == ["n1"]


def test_the_operator_client_sends_its_key(stack: LocalStack) -> None:
    fleet = OperatorClient(stack.base_url, api_key=FULL).fleet()
    assert [n["name"] for n in fleet["nodes"]] == ["n1"]
    assert OperatorClient(stack.base_url).health()["status"] == "ok"  # open
    with pytest.raises(OperatorError) as info:
        OperatorClient(stack.base_url).models()
    assert info.value.status == 401
    assert "--api-key" in info.value.message
    with pytest.raises(OperatorError) as wrong:
        OperatorClient(stack.base_url, api_key=WRONG).fleet()
    assert (wrong.value.status, wrong.value.message) == (401, "invalid API key")


# ------------------------------------------------------------------ the model allow-list


def test_a_model_outside_the_keys_list_is_403_everywhere(stack: LocalStack) -> None:
    with oa(stack, LIMITED) as client:
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(model=MODEL_B, messages=HI)
        body = info.value.body
        assert isinstance(body, dict)
        assert (body["type"], body["code"], body["param"]) == (
            "permission_error", "model_not_allowed", "model")
        with pytest.raises(openai.PermissionDeniedError):
            client.completions.create(model=MODEL_B, prompt="hi")
        with pytest.raises(openai.PermissionDeniedError):  # an alias of a model it may not use
            client.chat.completions.create(model="big", messages=HI)
        with pytest.raises(openai.PermissionDeniedError):  # unknown: 403, not a 404 that tells
            client.chat.completions.create(model="nope/x", messages=HI)
        with pytest.raises(openai.PermissionDeniedError):
            client.models.retrieve(MODEL_B)
        assert client.models.retrieve(MODEL_A).id == MODEL_A
        assert client.models.retrieve("fast").id == "fast"
        reply = client.chat.completions.create(model="fast", messages=HI)
        assert reply.model == "fast"
    with an(stack, LIMITED) as client:
        with pytest.raises(anthropic.PermissionDeniedError) as an_info:
            client.messages.create(model=MODEL_B, max_tokens=8,
                                   messages=AN_HI)
        an_body = an_info.value.body
        assert isinstance(an_body, dict) and an_body["error"]["type"] == "permission_error"
        with pytest.raises(anthropic.PermissionDeniedError):
            client.messages.count_tokens(model=MODEL_B, messages=AN_HI)
        assert client.messages.count_tokens(model=MODEL_A,
                                            messages=AN_HI).input_tokens > 0
    admin = httpx.post(f"{stack.base_url}/admin/models/unload", headers=bearer(LIMITED),
                       json={"model": MODEL_B}, timeout=5)
    assert admin.status_code == 403
    with oa(stack, FULL) as client, pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope/x", messages=HI)


def test_models_lists_only_what_the_key_may_use(stack: LocalStack) -> None:
    def fleet_models(key: str) -> list[str]:
        fleet = httpx.get(f"{stack.base_url}/admin/fleet", headers=bearer(key), timeout=5)
        return [m["id"] for node in fleet.json()["nodes"] for m in node["models"]]

    assert fleet_models(FULL) == [MODEL_A, MODEL_B]
    assert fleet_models(LIMITED) == [MODEL_A]  # the fleet view hides the others' models too
    with oa(stack, LIMITED) as client:
        assert sorted(m.id for m in client.models.list()) == ["fast", MODEL_A]
    with oa(stack, FULL) as client:
        assert sorted(m.id for m in client.models.list()) == ["big", "fast", MODEL_A, MODEL_B]


# ------------------------------------------------------------------ requests in flight


def test_an_open_stream_holds_the_keys_slot_until_it_ends(stack: LocalStack) -> None:
    wait_until_free(stack, LIMITED)
    with oa(stack, LIMITED) as client:
        stream = client.chat.completions.create(  # 40 tokens: about 2 s
            model=MODEL_A, messages=HOLD, stream=True, max_tokens=40)
        with stream:
            first = next(iter(stream))
            assert first.choices[0].delta.role == "assistant"
            assert_at_limit(stack, LIMITED)
            with oa(stack, FULL) as other:  # other keys are not limited by it
                other.models.list()
            rest = list(stream)
        assert rest and rest[-1].choices[0].finish_reason == "length"
    wait_until_free(stack, LIMITED)
    with oa(stack, LIMITED) as client:
        assert client.chat.completions.create(
            model=MODEL_A, messages=HI).choices[0].finish_reason == "stop"


def test_a_client_leaving_mid_stream_frees_the_slot_once(stack: LocalStack) -> None:
    wait_until_free(stack, LIMITED)
    body = {"model": MODEL_A, "messages": HOLD, "stream": True}
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", f"{stack.base_url}/v1/chat/completions", json=body,
            headers=bearer(LIMITED)) as held:
        assert held.status_code == 200
        lines = held.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert_at_limit(stack, LIMITED)
    # leaving the block closed the connection with ~20 s of the stream left
    wait_until_free(stack, LIMITED)
    # released exactly once: one stream takes the only slot again
    with oa(stack, LIMITED) as client:
        stream = client.chat.completions.create(
            model=MODEL_A, messages=HOLD, stream=True)
        with stream:
            next(iter(stream))
            assert_at_limit(stack, LIMITED)
    wait_until_free(stack, LIMITED)


def test_errors_never_leak_a_slot(stack: LocalStack) -> None:
    wait_until_free(stack, LIMITED)
    url = f"{stack.base_url}/v1/chat/completions"
    failures = [
        {"model": MODEL_B, "messages": HI},                      # 403 from the gateway
        {"model": MODEL_A, "messages": "not a list"},            # 400 from the gateway
        {"model": "test-org/keys-a-missing", "messages": HI},    # 404: allowed, not served
        {"model": MODEL_A, "messages": [{"role": "user", "content": "x " * 100}]},  # 400: neuron
        {"model": MODEL_A, "messages": [{"role": "user", "content": "x " * 100}],
         "stream": True},                                        # the same, streaming
    ]
    statuses = []
    for body in failures:
        statuses.append(httpx.post(url, json=body, headers=bearer(LIMITED), timeout=10)
                        .status_code)
    assert statuses == [403, 400, 404, 400, 400]
    # with a limit of one, any leaked slot would make this a 429
    ok = httpx.post(url, json={"model": MODEL_A, "messages": HI}, headers=bearer(LIMITED),
                    timeout=10)
    assert ok.status_code == 200


def test_logs_name_keys_and_never_show_them(stack: LocalStack,
                                            caplog: pytest.LogCaptureFixture) -> None:
    wait_until_free(stack, LIMITED)
    with caplog.at_level(logging.DEBUG):
        httpx.get(f"{stack.base_url}/v1/models", headers=bearer(WRONG), timeout=5)
        httpx.post(f"{stack.base_url}/v1/chat/completions", headers=bearer(LIMITED),
                   json={"model": MODEL_B, "messages": HI}, timeout=5)
        with oa(stack, LIMITED) as client:
            stream = client.chat.completions.create(
                model=MODEL_A, messages=HOLD, stream=True)
            with stream:
                next(iter(stream))
                httpx.get(f"{stack.base_url}/v1/models", headers=bearer(LIMITED), timeout=5)
        wait_until_free(stack, LIMITED)
    text = caplog.text
    assert "unknown API key" in text
    assert "app: refused model" in text and "app: refused, 1 requests already in flight" in text
    for key in (FULL, LIMITED, WRONG):
        assert key not in text
