"""OpenAI error paths end to end: each failure gets OpenAI's shape and the status from the one
error table, before the 200 as a real status and after it as an error event then ``[DONE]``."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cortex.embedded_nats import EmbeddedNatsServer
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = pytest.mark.e2e
MODEL = "test-org/errors-1.0"
HI = [{"role": "user", "content": "hi"}]


def model_file(tmp_path: Path) -> str:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    return str(path)


def sse_events(response: httpx.Response) -> list[bytes]:
    return [line.encode() for line in response.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def slow_stack(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """One job slot, a model that takes ~2 s, and jobs that expire after 0.5 s."""
    script = Script(words=tuple(f" w{i}" for i in range(20)), token_delay_s=0.1)
    with LocalStack(
        nats_url=nats_server.url, root="e2e-openai-errors", engine=ScriptedEngine(script),
        models=[ModelSpec(source=model_file(tmp_path_factory.mktemp("slow")),
                          served_name=MODEL)],
        neuron=NeuronSettings(max_jobs=1),
        gateway=GatewaySettings(job_deadline_s=0.5, max_body_bytes=4096),
    ) as running:
        yield running


def test_expired_deadline_is_504_timeout(slow_stack: LocalStack) -> None:
    with slow_stack.openai_client() as client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
    assert info.value.status_code == 504
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "timeout"
    assert "deadline" in body["message"]
    assert info.value.response.headers["x-should-retry"] == "false"


def test_expired_deadline_mid_stream_is_an_error_event(slow_stack: LocalStack) -> None:
    body = {"model": MODEL, "messages": HI, "stream": True}
    with httpx.stream("POST", f"{slow_stack.base_url}/v1/chat/completions", json=body,
                      timeout=10) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert (error["type"], error["code"]) == ("server_error", "timeout")
    assert any(b'"content"' in e for e in events[1:-2]), "some tokens came before the deadline"


def test_busy_neuron_is_429_with_retry_after(slow_stack: LocalStack) -> None:
    body = {"model": MODEL, "messages": HI, "stream": True}
    with httpx.stream("POST", f"{slow_stack.base_url}/v1/chat/completions", json=body,
                      timeout=10) as holding:
        assert holding.status_code == 200  # accepted: the one slot is taken
        second = httpx.post(f"{slow_stack.base_url}/v1/chat/completions",
                            json={"model": MODEL, "messages": HI}, timeout=10)
    assert second.status_code == 429
    assert second.headers["retry-after"] == "1"
    error = second.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")


def test_body_over_the_limit_is_413_in_openai_shape(slow_stack: LocalStack) -> None:
    big = [{"role": "user", "content": "x" * 8000}]
    response = httpx.post(f"{slow_stack.base_url}/v1/chat/completions",
                          json={"model": MODEL, "messages": big}, timeout=10)
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")


def test_engine_failure_mid_stream_and_before_any_token(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    with LocalStack(
        nats_url=nats_server.url, root="e2e-openai-engine-fail",
        engine=ScriptedEngine(Script(fail_after=2)),
        models=[ModelSpec(source=model_file(tmp_path), served_name=MODEL)],
    ) as stack:
        body = {"model": MODEL, "messages": HI, "stream": True}
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body,
                          timeout=10) as response:
            assert response.status_code == 200
            events = sse_events(response)
        with stack.openai_client() as client, pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_error")
    content = "".join(json.loads(e.removeprefix(b"data: "))["choices"][0]["delta"]
                      .get("content", "") for e in events[:-2])
    assert content == "Hello from"
    assert info.value.status_code == 502


def test_a_client_gone_before_the_first_byte_frees_the_neuron(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    """The 200 and headers go out, the client has already closed its socket: whether or not the
    body ever started, the job is cancelled on the neuron and the gateway forgets it."""
    script = Script(words=tuple(f" w{i}" for i in range(50)), token_delay_s=0.1)  # ~5 s
    with LocalStack(
        nats_url=nats_server.url, root="e2e-openai-gone", engine=ScriptedEngine(script),
        models=[ModelSpec(source=model_file(tmp_path), served_name=MODEL)],
    ) as stack:
        assert stack.bus is not None
        body = json.dumps({"model": MODEL, "messages": HI, "stream": True}).encode()
        host, port = stack.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert sock.recv(12) == b"HTTP/1.1 200"  # accepted; the client leaves at once
        deadline = time.monotonic() + 3.0
        while stack.bus.running_on("n1") or _neuron_busy(stack):
            assert time.monotonic() < deadline, "the job should be cancelled, not run for 5 s"
            time.sleep(0.05)


def _neuron_busy(stack: LocalStack) -> bool:
    assert stack.bus is not None
    node = stack.bus.fleet.node("n1")
    return node is None or node.heartbeat.jobs_running > 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_bodies_that_are_not_json_are_415(slow_stack: LocalStack, path: str,
                                          content_type: str | None) -> None:
    body = json.dumps({"model": MODEL, "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{slow_stack.base_url}{path}", content=body, headers=headers,
                          timeout=10)
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["error"]["message"]
