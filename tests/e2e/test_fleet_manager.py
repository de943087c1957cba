"""The fleet manager end to end (REFERENCE §4, §5): catalogued models are advertised while
unloaded, loaded on first request while the request waits (keep-alives on the wire), loaded once
however many ask, and evicted by the configured policy when the neuron has room for one model;
pinned models stay, the residency floor stops thrash, two gateways agree."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from cortex.catalogue import Catalogue
from cortex.config import ModelEntry, ModelsConfig
from cortex.embedded_nats import EmbeddedNatsServer
from cortex.manager import DEFRAG_WARNING
from cortex.settings import GatewaySettings
from neuron.settings import NeuronSettings
from tests.support.hub_cache import cache_repo
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = pytest.mark.e2e
A, B = "test-org/model-a", "test-org/model-b"
QUANTS = "test-org/quants-GGUF"
ANSWER = Script().words
CHAT = [{"role": "user", "content": "hi"}]


def _catalogue(*entries: ModelEntry, aliases: dict[str, str] | None = None) -> Catalogue:
    return Catalogue.of(ModelsConfig(models=list(entries), aliases=aliases or {}))


def _entry(model: str, **kw: object) -> ModelEntry:
    return ModelEntry(id=model, harness="torch", vram_mb=600, **kw)  # type: ignore[arg-type]


class Fleet:
    """A stack whose neuron starts empty, with room for one 600 MiB model (budget 1000 MiB)."""

    def __init__(self, stack: LocalStack, engine: ScriptedEngine) -> None:
        self.stack, self.engine = stack, engine

    def chat(self, model: str, *, base_url: str | None = None) -> str:
        client = openai.OpenAI(base_url=f"{base_url or self.stack.base_url}/v1", api_key="x",
                               max_retries=0, timeout=60)
        done = client.chat.completions.create(model=model, messages=CHAT)  # type: ignore[arg-type]
        return done.choices[0].message.content or ""

    def models(self, base_url: str | None = None) -> dict[str, dict[str, object]]:
        body = httpx.get(f"{base_url or self.stack.base_url}/v1/models", timeout=10).json()
        return {card["id"]: card for card in body["data"]}

    def resident(self) -> list[str]:
        assert self.stack.worker is not None
        return [slot.model_id for slot in self.stack.worker.residency.loaded()]

    def loads(self) -> list[str]:
        return [m.files.model_id for m in self.engine.loaded]


def _start(nats_url: str, tmp_path: Path, root: str, *, catalogue: Catalogue,
           script: Script | None = None, gateways: int = 1, **gateway: object) -> LocalStack:
    cache = tmp_path / "hub"
    for model in (A, B):
        cache_repo(cache, model, {"model.gguf": b"GGUF"})
    cache_repo(cache, QUANTS, {"m-q4_k_m.gguf": b"GGUF", "m-q6_k_p.gguf": b"GGUF"})
    engine = ScriptedEngine(script or Script())
    settings = replace(GatewaySettings(catalogue=catalogue, keepalive_interval_s=0.2,
                                       min_residency_s=0.0), **gateway)  # type: ignore[arg-type]
    stack = LocalStack(nats_url=nats_url, root=root, engine=engine, models=(),
                       gateway=settings, gateways=gateways,
                       neuron=NeuronSettings(hf_cache=cache, memory_budget_mb=1000))
    stack.engine = engine  # type: ignore[attr-defined]
    return stack


@pytest.fixture
def make_fleet(nats_server: EmbeddedNatsServer, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[object]:
    stacks: list[LocalStack] = []

    def make(**kw: object) -> Fleet:
        root = f"fleet-{request.node.name[-30:]}-{len(stacks)}"
        stack = _start(nats_server.url, tmp_path, root, **kw)  # type: ignore[arg-type]
        stacks.append(stack)
        stack.start()
        return Fleet(stack, stack.engine)  # type: ignore[attr-defined]

    yield make
    for stack in stacks:
        stack.stop()


def test_a_catalogued_model_is_advertised_unloaded_then_loaded_by_its_first_request(
    make_fleet: object,
) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(_entry(A), aliases={"small": A}),  # type: ignore[operator]
                              script=Script(load_delay_s=1.2))
    before = fleet.models()
    assert before[A]["loaded"] is False
    assert before[A]["feasible_on"] == ["n1"]
    assert before[A]["locations"] == []
    assert before["small"]["feasible_on"] == ["n1"]  # the alias mirrors its target

    seen_loading: list[object] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            locations = fleet.models()[A]["locations"]
            if any(loc["status"] == "loading" for loc in locations):  # type: ignore[attr-defined]
                seen_loading.append(locations)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    lines: list[str] = []
    try:
        with httpx.stream("POST", f"{fleet.stack.base_url}/v1/chat/completions", timeout=30,
                          json={"model": A, "messages": CHAT, "stream": True}) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
    finally:
        stop.set()
        watcher.join()
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: {"))
    keepalives = [line for line in lines[:first_data] if line.startswith(":")]
    assert len(keepalives) >= 3  # about 1.2 s of loading at one per 0.2 s (and one at once)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[first_data:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == "".join(ANSWER)
    assert seen_loading, "/v1/models never showed the model loading"
    after = fleet.models()
    assert after[A]["loaded"] is True
    assert after[A]["locations"] == [{"node": "n1", "status": "loaded",
                                      "vram_estimate_mb": None}]
    assert fleet.loads() == [A]


def test_an_anthropic_stream_pings_while_the_model_loads(make_fleet: object) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(_entry(A)),  # type: ignore[operator]
                              script=Script(load_delay_s=0.8))
    with httpx.stream("POST", f"{fleet.stack.base_url}/v1/messages", timeout=30,
                      headers={"anthropic-version": "2023-06-01"},
                      json={"model": A, "max_tokens": 50, "stream": True,
                            "messages": CHAT}) as response:
        events = [line for line in response.iter_lines() if line.startswith("event:")]
    start = events.index("event: message_start")
    assert start >= 2 and set(events[:start]) == {"event: ping"}
    assert events[-1] == "event: message_stop"
    # and the real SDK reads such a stream
    client = fleet.stack.anthropic_client()
    with client.messages.stream(model=A, max_tokens=50, messages=CHAT) as stream:  # type: ignore[arg-type]
        text = stream.get_final_text()
    assert text == "".join(ANSWER)


def test_ten_concurrent_first_requests_cause_one_load(make_fleet: object) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(_entry(A)),  # type: ignore[operator]
                              script=Script(load_delay_s=1.0))
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: fleet.chat(A), range(10)))
    assert answers == ["".join(ANSWER)] * 10
    assert fleet.loads() == [A]


def test_two_gateways_share_one_load_and_agree_on_the_models(make_fleet: object) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(_entry(A), _entry(B)),  # type: ignore[operator]
                              script=Script(load_delay_s=1.0), gateways=2)
    urls = fleet.stack.base_urls
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda i: fleet.chat(A, base_url=urls[i % 2]), range(10)))
    assert answers == ["".join(ANSWER)] * 10
    assert fleet.loads() == [A]
    deadline = time.monotonic() + 5
    while fleet.models(urls[0]) != fleet.models(urls[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fleet.models(urls[0]) == fleet.models(urls[1])
    assert fleet.models(urls[1])[A]["loaded"] is True


def test_lru_evicts_the_least_recently_used_model_to_make_room(
    make_fleet: object, caplog: pytest.LogCaptureFixture,
) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(_entry(A), _entry(B)),  # type: ignore[operator]
                              defrag_after_cycles=3)
    for model in (A, B, A):
        assert fleet.chat(model) == "".join(ANSWER)
        assert fleet.resident() == [model]
    assert DEFRAG_WARNING not in caplog.text
    assert fleet.chat(B) == "".join(ANSWER)
    assert fleet.resident() == [B]
    assert fleet.loads() == [A, B, A, B]
    fleet_json = httpx.get(f"{fleet.stack.base_url}/admin/fleet", timeout=10).json()
    assert fleet_json["nodes"][0]["evictions"] == 3
    assert DEFRAG_WARNING in caplog.text  # the third eviction on n1 reached the threshold


def test_priority_lets_only_a_higher_priority_newcomer_displace(make_fleet: object) -> None:
    fleet: Fleet = make_fleet(  # type: ignore[operator]
        catalogue=_catalogue(_entry(A, residency_priority=10), _entry(B, residency_priority=500)),
        eviction="priority")
    assert fleet.chat(A)
    assert fleet.chat(B)  # 500 > 10: A makes room
    assert fleet.resident() == [B]
    with pytest.raises(openai.APIStatusError) as refused:
        fleet.chat(A)  # 10 < 500: B stays
    assert refused.value.status_code == 503
    assert "lower residency priority" in str(refused.value)
    assert refused.value.response.headers.get("retry-after")
    assert fleet.resident() == [B]


def test_a_pinned_model_is_never_evicted(make_fleet: object) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(_entry(A), _entry(B)))  # type: ignore[operator]
    assert fleet.chat(A)
    pinned = httpx.post(f"{fleet.stack.base_url}/admin/models/pin", timeout=10,
                        json={"model": A})
    assert pinned.json() == {"model": A, "nodes": ["n1"], "pinned": True}
    with pytest.raises(openai.APIStatusError) as refused:
        fleet.chat(B)
    assert refused.value.status_code == 503
    assert fleet.resident() == [A]
    httpx.post(f"{fleet.stack.base_url}/admin/models/pin", timeout=10,
               json={"model": A, "pinned": False})
    assert fleet.chat(B)
    assert fleet.resident() == [B]


def test_the_residency_floor_stops_two_models_thrashing(make_fleet: object) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(_entry(A), _entry(B)),  # type: ignore[operator]
                              min_residency_s=60.0)
    assert fleet.chat(A)
    with pytest.raises(openai.APIStatusError) as refused:
        fleet.chat(B)
    assert refused.value.status_code == 503
    assert 55 <= int(refused.value.response.headers["retry-after"]) <= 60
    assert fleet.resident() == [A]
    assert fleet.loads() == [A]


def test_an_unknown_model_is_404_and_a_full_queue_is_503(make_fleet: object) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(_entry(A)),  # type: ignore[operator]
                              script=Script(load_delay_s=1.5), load_queue_depth=2)
    with pytest.raises(openai.NotFoundError):
        fleet.chat("test-org/nobody-has-it")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(fleet.chat, A) for _ in range(4)]
        results = [f.exception() or f.result() for f in futures]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(refused) == 2 and all(r.status_code == 503 for r in refused)
    assert all(r.response.headers.get("retry-after") for r in refused)
    assert results.count("".join(ANSWER)) == 2
    assert fleet.loads() == [A]


def test_aliases_reach_a_cold_model(make_fleet: object) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(  # type: ignore[operator]
        _entry(A), aliases={"claude-*": A}))
    client = fleet.stack.anthropic_client()
    reply = client.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=CHAT)  # type: ignore[arg-type]
    assert reply.model == "claude-sonnet-4-6"
    assert fleet.loads() == [A]


def test_operator_load_unload_and_status_show_memory(make_fleet: object,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from cortex.cli import app

    fleet: Fleet = make_fleet(catalogue=_catalogue(_entry(A), _entry(B)))  # type: ignore[operator]
    url = fleet.stack.base_url
    assert app(["load", A, "-e", url], result_action="return_value") == 0
    assert fleet.resident() == [A]
    assert app(["status", "-e", url], result_action="return_value") == 0
    out = capsys.readouterr().out
    assert f"{A}" in out and "n1(loaded)" in out
    assert "600" in out  # the model's memory and the node's budget use
    assert app(["unload", A, "-e", url], result_action="return_value") == 0
    assert fleet.resident() == []
    assert app(["load", "test-org/unknown", "-e", url], result_action="return_value") == 1
    assert "not found" in capsys.readouterr().err



def test_a_preflight_failure_is_a_422_with_its_kind_as_the_code(make_fleet: object) -> None:
    fleet: Fleet = make_fleet(catalogue=_catalogue(  # type: ignore[operator]
        ModelEntry(id=QUANTS, harness="torch", quant="q6k")))
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        fleet.chat(QUANTS)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "quant_not_found"
    assert "nearest: q6_k_p" in error["message"]
    assert fleet.loads() == []
