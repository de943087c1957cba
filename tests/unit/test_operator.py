"""Operator commands (`cortex models|load|unload|pin|unpin|status`) against a real local HTTP server
serving canned answers, and the report formatters on their own."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cortex.cli import app, format_status
from cortex.operator import (
    LOAD_TIMEOUT_S,
    GatewayUnreachable,
    OperatorClient,
    OperatorError,
    format_fleet,
    format_models,
    model_state,
)

HEALTH = {"status": "ok", "nodes": {"healthy": 1, "total": 2}}
MODELS = {"object": "list", "data": [
    {"id": "helexa/small", "loaded": False, "feasible_on": [], "locations": []},
    {"id": "Qwen/Qwen3.6-27B", "loaded": False, "feasible_on": ["beast"],
     "locations": [{"node": "beast", "status": "loading", "vram_estimate_mb": None}],
     "load_progress": 0.42},
    {"id": "Qwen/Qwen3-8B", "loaded": True, "feasible_on": ["benjy", "beast"],
     "locations": [{"node": "benjy", "status": "loaded", "vram_estimate_mb": None}],
     "max_model_len": 32768},
]}
FLEET = {"nodes": [
    {"name": "beast", "healthy": False, "draining": True, "last_seen_s": 42.0,
     "devices": [], "models": []},
    {"name": "benjy", "healthy": True, "draining": False, "last_seen_s": 0.4,
     "devices": [
         {"index": 0, "kind": "cuda", "name": "NVIDIA H200", "memory_total_mb": 143771,
          "memory_free_mb": 100000, "budget_mb": 131072, "models_mb": 16384},
         {"index": 0, "kind": "cpu", "name": "CPU", "memory_total_mb": 65536,
          "memory_free_mb": 60000, "budget_mb": None, "models_mb": 0},
     ],
     "models": [
         {"id": "Qwen/Qwen3-8B", "status": "loaded", "memory_mb": 16384, "pinned": True,
          "jobs_running": 2, "last_used_at": 1717230000.0},
         {"id": "Qwen/Qwen3.6-27B", "status": "loading", "memory_mb": None, "pinned": False,
          "jobs_running": 0, "last_used_at": None},
     ]},
]}

FLEET_REPORT = (
    "Nodes:\n"
    "  beast: stale, draining, seen 42.0 s ago\n"
    "    (no devices reported)\n"
    "    (no models)\n"
    "  benjy: healthy, seen 0.4 s ago\n"
    "    cuda:0  NVIDIA H200  used 43771 MiB  budget 131072 MiB  total 143771 MiB"
    "  models 16384 MiB\n"
    "    cpu     CPU          used 5536 MiB   budget -           total 65536 MiB   models 0 MiB\n"
    "    Qwen/Qwen3-8B     loaded   16384 MiB  pinned  jobs 2\n"
    "    Qwen/Qwen3.6-27B  loading  -                  jobs 0"
)

STATUS_REPORT = (  # REFERENCE §10, byte for byte
    'Fleet health: {\n  "nodes": {\n    "healthy": 1,\n    "total": 2\n  },\n'
    '  "status": "ok"\n}\n\nModels:\n'
    "  Qwen/Qwen3-8B                            benjy(loaded)\n"
    "  Qwen/Qwen3.6-27B                         beast(loading)\n"
    "  helexa/small                             "
)


# ------------------------------------------------------------------ a canned gateway


@dataclass
class Canned:
    status: int
    body: bytes
    delay_s: float = 0.0


def canned(status: int, payload: object) -> Canned:
    return Canned(status, json.dumps(payload).encode())


@dataclass
class FakeGateway:
    url: str
    routes: dict[tuple[str, str], Canned] = field(default_factory=dict)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    fake = FakeGateway(url="")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            fake.requests.append((method, self.path, json.loads(raw) if raw else None))
            answer = fake.routes.get((method, self.path)) or canned(
                404, {"status_code": 404, "detail": "Not Found"})
            time.sleep(answer.delay_s)
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _no_cortex_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CORTEX_ENDPOINT", "CORTEX_NODE", "CORTEX_MODEL"):
        monkeypatch.delenv(name, raising=False)


def cortex(*argv: str) -> int:
    result = app(list(argv), result_action="return_value")
    assert isinstance(result, int)
    return result


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def error_body(message: str, code: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


# ------------------------------------------------------------------ formatters


def test_models_table_sorted_with_state_where_and_feasible_nodes() -> None:
    assert format_models(MODELS) == (
        "MODEL             STATE        WHERE           FEASIBLE ON\n"
        "Qwen/Qwen3-8B     loaded       benjy(loaded)   benjy, beast\n"
        "Qwen/Qwen3.6-27B  loading 42%  beast(loading)  beast\n"
        "helexa/small      unloaded     -               -"
    )


def test_models_table_without_models() -> None:
    assert format_models({"object": "list", "data": []}) == "No models."
    assert format_models(None) == "No models."


@pytest.mark.parametrize(
    ("entry", "state"),
    [
        ({"loaded": True, "locations": [{"node": "a", "status": "loaded"}]}, "loaded"),
        ({"loaded": False, "locations": [{"node": "a", "status": "loading"}]}, "loading"),
        ({"locations": [{"node": "a", "status": "reloading"}], "load_progress": 1.0},
         "loading 100%"),
        ({"locations": [{"node": "a", "status": "loading"}], "load_progress": 0.004},
         "loading 0%"),
        ({"locations": [{"node": "a", "status": "poisoned"}]}, "poisoned"),
        ({"locations": [{"node": "a", "status": "recovering"},
                        {"node": "b", "status": "poisoned"}]}, "recovering"),
        ({"locations": [{"node": "a", "status": "unloaded"}]}, "unloaded"),
        ({}, "unloaded"),
    ],
)
def test_model_state(entry: dict[str, Any], state: str) -> None:
    assert model_state(entry) == state


def test_fleet_report_shows_devices_memory_and_models_per_node() -> None:
    assert format_fleet(FLEET) == FLEET_REPORT


def test_fleet_report_tolerates_an_empty_or_partial_answer() -> None:
    assert format_fleet({"nodes": []}) == "Nodes:\n  (none)"
    assert format_fleet({"nodes": [{"name": "n", "healthy": True}]}) == (
        "Nodes:\n  n: healthy\n    (no devices reported)\n    (no models)"
    )


# ------------------------------------------------------------------ commands


def test_models_command_prints_the_table(gateway: FakeGateway,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    gateway.routes[("GET", "/v1/models")] = canned(200, MODELS)
    assert cortex("models", "-e", gateway.url) == 0
    out, err = capsys.readouterr()
    assert out == format_models(MODELS) + "\n"
    assert err == ""


def test_load_posts_the_model_and_node(gateway: FakeGateway,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    gateway.routes[("POST", "/admin/models/load")] = canned(
        200, {"model": "Qwen/Qwen3-8B", "node": "benjy", "status": "loaded"})
    assert cortex("load", "Qwen/Qwen3-8B", "--node", "benjy", "--endpoint", gateway.url) == 0
    assert gateway.requests == [
        ("POST", "/admin/models/load", {"model": "Qwen/Qwen3-8B", "node": "benjy"})]
    out, err = capsys.readouterr()
    assert out == "Loaded Qwen/Qwen3-8B on benjy\n"
    assert err == "Loading Qwen/Qwen3-8B on benjy...\n"


def test_load_without_node_lets_the_gateway_place_it_and_waits_long(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    timeouts: list[float] = []
    real_urlopen = urllib.request.urlopen

    def urlopen(request: Any, timeout: float) -> Any:
        timeouts.append(timeout)
        return real_urlopen(request, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    gateway.routes[("POST", "/admin/models/load")] = canned(
        200, {"model": "helexa/small", "node": "beast", "status": "loaded"})
    assert cortex("load", "helexa/small", "-e", gateway.url) == 0
    assert gateway.requests[0][2] == {"model": "helexa/small", "node": None}
    assert timeouts == [LOAD_TIMEOUT_S]
    assert capsys.readouterr().out == "Loaded helexa/small on beast\n"


def test_unload_from_every_node(gateway: FakeGateway,
                                capsys: pytest.CaptureFixture[str]) -> None:
    gateway.routes[("POST", "/admin/models/unload")] = canned(
        200, {"model": "Qwen/Qwen3-8B", "nodes": ["benjy", "beast"], "status": "unloaded"})
    assert cortex("unload", "Qwen/Qwen3-8B", "-e", gateway.url) == 0
    assert gateway.requests[0][2] == {"model": "Qwen/Qwen3-8B", "node": None}
    assert capsys.readouterr() == ("Unloaded Qwen/Qwen3-8B from benjy, beast\n", "")


def test_unload_from_one_node_and_from_none(gateway: FakeGateway,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    gateway.routes[("POST", "/admin/models/unload")] = canned(
        200, {"model": "m", "nodes": [], "status": "unloaded"})
    assert cortex("unload", "m", "-n", "benjy", "-e", gateway.url) == 0
    assert gateway.requests[0][2] == {"model": "m", "node": "benjy"}
    assert capsys.readouterr().out == "m was not loaded anywhere\n"


@pytest.mark.parametrize(("command", "pinned", "line"), [
    ("pin", True, "Pinned Qwen/Qwen3-8B on benjy\n"),
    ("unpin", False, "Unpinned Qwen/Qwen3-8B on benjy\n"),
])
def test_pin_and_unpin(gateway: FakeGateway, capsys: pytest.CaptureFixture[str],
                       command: str, pinned: bool, line: str) -> None:
    gateway.routes[("POST", "/admin/models/pin")] = canned(
        200, {"model": "Qwen/Qwen3-8B", "nodes": ["benjy"], "pinned": pinned})
    assert cortex(command, "Qwen/Qwen3-8B", "--node", "benjy", "-e", gateway.url) == 0
    assert gateway.requests == [("POST", "/admin/models/pin",
                                 {"model": "Qwen/Qwen3-8B", "node": "benjy", "pinned": pinned})]
    assert capsys.readouterr() == (line, "")


@pytest.mark.parametrize(("argv", "route"), [
    (["load", "nope"], ("POST", "/admin/models/load")),
    (["unload", "nope"], ("POST", "/admin/models/unload")),
    (["pin", "nope"], ("POST", "/admin/models/pin")),
    (["unpin", "nope"], ("POST", "/admin/models/pin")),
    (["models"], ("GET", "/v1/models")),
])
def test_error_body_becomes_an_error_line_and_exit_1(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str],
    argv: list[str], route: tuple[str, str],
) -> None:
    gateway.routes[route] = canned(404, error_body("model 'nope' not found", "model_not_found"))
    assert cortex(*argv, "-e", gateway.url) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("Error: model 'nope' not found\n")


def test_unreachable_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert cortex("models", "-e", url) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"Error: cannot reach {url}: ")
    assert err.count("\n") == 1


def test_endpoint_without_a_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    assert cortex("unload", "m", "-e", "localhost:31313") == 1
    assert capsys.readouterr().err == (
        "Error: invalid endpoint 'localhost:31313': not an http(s) URL\n")


# ------------------------------------------------------------------ status


def test_status_adds_the_fleet_section(gateway: FakeGateway,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    gateway.routes[("GET", "/health")] = canned(200, HEALTH)
    gateway.routes[("GET", "/v1/models")] = canned(200, MODELS)
    gateway.routes[("GET", "/admin/fleet")] = canned(200, FLEET)
    assert cortex("status", "-e", gateway.url + "/") == 0
    assert [path for _, path, _ in gateway.requests] == ["/health", "/v1/models", "/admin/fleet"]
    assert capsys.readouterr() == (STATUS_REPORT + "\n\n" + FLEET_REPORT + "\n", "")


def test_status_without_the_fleet_route_is_the_reference_report(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str],
) -> None:
    gateway.routes[("GET", "/health")] = canned(200, HEALTH)
    gateway.routes[("GET", "/v1/models")] = canned(200, MODELS)
    assert format_status(HEALTH, MODELS) == STATUS_REPORT
    assert cortex("status", "-e", gateway.url) == 0
    assert capsys.readouterr() == (STATUS_REPORT + "\n", "")


def test_status_reports_a_failing_fleet_route_after_the_reference_part(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str],
) -> None:
    gateway.routes[("GET", "/health")] = canned(200, HEALTH)
    gateway.routes[("GET", "/v1/models")] = canned(200, MODELS)
    gateway.routes[("GET", "/admin/fleet")] = canned(500, error_body("fleet view broken"))
    assert cortex("status", "-e", gateway.url) == 1
    assert capsys.readouterr() == (STATUS_REPORT + "\n", "Error: fleet view broken\n")


def test_status_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert cortex("status", "-e", url) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"Error: cannot reach {url}: ")


# ------------------------------------------------------------------ the client


def test_client_error_without_the_error_shape(gateway: FakeGateway) -> None:
    client = OperatorClient(gateway.url)
    gateway.routes[("GET", "/a")] = Canned(502, b"upstream down")
    gateway.routes[("GET", "/b")] = Canned(503, b"")
    gateway.routes[("GET", "/c")] = canned(400, {"error": "bad model"})
    with pytest.raises(OperatorError) as plain:
        client.get("/a")
    assert (plain.value.status, plain.value.message) == (502, "HTTP 502 Bad Gateway: upstream down")
    with pytest.raises(OperatorError) as empty:
        client.get("/b")
    assert (empty.value.status, empty.value.message) == (503, "HTTP 503 Service Unavailable")
    with pytest.raises(OperatorError) as bare:
        client.get("/c")
    assert bare.value.message == "bad model"
    with pytest.raises(OperatorError) as litestar:
        client.get("/missing")
    assert (litestar.value.status, litestar.value.message) == (404, "HTTP 404: Not Found")


def test_client_error_fields(gateway: FakeGateway) -> None:
    gateway.routes[("POST", "/admin/models/pin")] = canned(
        409, error_body("not loaded on benjy", "model_not_loaded"))
    with pytest.raises(OperatorError) as caught:
        OperatorClient(gateway.url).pin("m", "benjy")
    error = caught.value
    assert (error.status, error.message, error.code, error.error_type) == (
        409, "not loaded on benjy", "model_not_loaded", "invalid_request_error")
    assert str(error) == "not loaded on benjy"


def test_client_refuses_a_non_json_success(gateway: FakeGateway) -> None:
    gateway.routes[("GET", "/health")] = Canned(200, b"<html>")
    with pytest.raises(OperatorError, match="not JSON") as caught:
        OperatorClient(gateway.url).health()
    assert caught.value.status == 200


def test_client_timeout(gateway: FakeGateway) -> None:
    gateway.routes[("GET", "/admin/fleet")] = Canned(200, b"{}", delay_s=0.5)
    with pytest.raises(GatewayUnreachable, match=r"timed out after 0\.1 s"):
        OperatorClient(gateway.url, timeout_s=0.1).fleet()
