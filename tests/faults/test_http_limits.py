"""Oversize request heads against a real gateway: one huge header, many headers, a huge URL, each
answered 431 with an OpenAI-shaped JSON error and a closed connection (`cortex.server`), while
heads under the limit and big bodies behind small heads are served as before; and an idle
kept-alive connection that outlives the clients' own idle expiry (`cortex.server.KEEP_ALIVE_S`)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cortex.embedded_nats import EmbeddedNatsServer
from cortex.server import HEAD_LIMIT_BYTES, KEEP_ALIVE_S
from neuron.settings import ModelSpec
from tests.support.scripted_engine import ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
MODEL = "test-org/limits-1.0"
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def stack(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    model = Path(tmp_path_factory.mktemp("limits")) / "model.gguf"
    model.write_bytes(b"")
    with LocalStack(nats_url=nats_server.url, root="faults-http-limits", engine=ScriptedEngine(),
                    models=[ModelSpec(source=str(model), served_name=MODEL)]) as running:
        yield running


def _address(stack: LocalStack) -> tuple[str, int]:
    host, port = stack.base_url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(stack: LocalStack, request: bytes) -> tuple[bytes, bool]:
    """Send ``request`` on a fresh connection; everything the gateway answered, and whether it
    closed the connection (an orderly close, not a reset or a hang)."""
    with socket.create_connection(_address(stack), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
        return received, True


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return int(status_line.split(" ")[1]), headers, body


def get(path: str, extra_headers: bytes = b"", *, close: bool = True) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gateway\r\n" + connection
            + extra_headers + b"\r\n")


def assert_431(response: bytes, closed: bool) -> None:
    status, headers, body = parse(response)
    assert status == 431, response[:200]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error",
                                              "request_header_fields_too_large")
    assert str(HEAD_LIMIT_BYTES) in error["message"]
    assert closed, "the gateway must close the connection after a 431"


def test_one_header_of_a_megabyte_is_431_and_closed(stack: LocalStack) -> None:
    response, closed = exchange(stack, get("/health", b"X-Big: " + b"a" * 1_000_000 + b"\r\n"))
    assert_431(response, closed)


def test_many_headers_totalling_over_the_limit_are_431(stack: LocalStack) -> None:
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 500) for i in range(200))  # ~100 KiB
    response, closed = exchange(stack, get("/health", many))
    assert_431(response, closed)


def test_a_url_over_the_limit_is_431(stack: LocalStack) -> None:
    response, closed = exchange(stack, get("/health?q=" + "u" * (HEAD_LIMIT_BYTES + 10)))
    assert_431(response, closed)


def test_a_huge_header_on_a_post_is_431_before_any_job(stack: LocalStack) -> None:
    request = (b"POST /v1/messages HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
               b"X-Big: " + b"c" * 200_000 + b"\r\n"
               b"Content-Length: %d\r\n\r\n" % len(CHAT) + CHAT)
    response, closed = exchange(stack, request)
    assert_431(response, closed)


def test_headers_just_under_the_limit_are_served(stack: LocalStack) -> None:
    room = HEAD_LIMIT_BYTES - len(get("/health")) - len(b"X-Big: \r\n") - 1
    response, closed = exchange(stack, get("/health", b"X-Big: " + b"a" * room + b"\r\n"))
    status, _, body = parse(response)
    assert (status, json.loads(body)["status"]) == (200, "ok")
    assert closed  # Connection: close


def test_a_body_bigger_than_the_head_limit_behind_small_headers_is_not_431(
    stack: LocalStack,
) -> None:
    """Body bytes that arrive in the same read as the head do not count against the head."""
    body = json.dumps({"model": MODEL, "max_tokens": 3,
                       "messages": [{"role": "user", "content": "x" * 300_000}]}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    response, _ = exchange(stack, request)
    status, _, answer = parse(response)
    assert status == 200, answer[:300]
    assert json.loads(answer)["object"] == "chat.completion"


def test_the_limit_is_per_request_on_a_kept_alive_connection(stack: LocalStack) -> None:
    """Requests on one connection each get the whole allowance; the oversize one is refused."""
    near = b"X-Big: " + b"a" * (HEAD_LIMIT_BYTES // 2) + b"\r\n"
    requests = (get("/health", near, close=False) * 3
                + get("/health", b"X-Big: " + b"z" * (2 * HEAD_LIMIT_BYTES) + b"\r\n"))
    response, closed = exchange(stack, requests)
    parts = response.split(b"HTTP/1.1 ")[1:]
    assert [int(p[:3]) for p in parts] == [200, 200, 200, 431]
    assert_431(b"HTTP/1.1 " + parts[-1], closed)


def test_httpx_reads_the_431_instead_of_a_reset(stack: LocalStack) -> None:
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", content=CHAT,
                          headers={"content-type": "application/json",
                                   "x-big": "y" * 1_000_000}, timeout=10)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"


def test_the_gateway_still_serves_after_refusals(stack: LocalStack) -> None:
    for _ in range(3):
        exchange(stack, get("/health", b"X-Big: " + b"a" * 300_000 + b"\r\n"))
    with stack.openai_client() as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello from the scripted model."


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response with a content-length from a kept-alive connection: (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the gateway closed the connection after {data[:200]!r}"
        data += chunk
    status, headers, body = parse(data)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the gateway closed the connection mid-body"
        body += chunk
    return status, body


def test_an_idle_connection_outlives_the_clients_idle_expiry(stack: LocalStack) -> None:
    """httpx (so the OpenAI and Anthropic SDKs) drops an idle connection after 5 s; the gateway
    keeps it longer, so a client never reuses a connection the gateway is closing at that moment
    (the request would be reset before reaching the gateway)."""
    client_expiry = httpx.Limits().keepalive_expiry
    assert client_expiry is not None and client_expiry < KEEP_ALIVE_S
    with socket.create_connection(_address(stack), timeout=10) as sock:
        sock.sendall(get("/health", close=False))
        assert _read_response(sock)[0] == 200
        time.sleep(client_expiry + 1.0)
        sock.sendall(get("/health", close=False))
        status, body = _read_response(sock)
    assert (status, json.loads(body)["status"]) == (200, "ok")
