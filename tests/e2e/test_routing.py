"""Routing across replicas (REFERENCE §5.1): the least-loaded healthy neuron gets the job; a busy
one passes it on; a stale one gets none; one that does not accept in time is told to cancel and
never runs the job later."""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cortex.embedded_nats import EmbeddedNatsServer
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from tests.support.background_worker import BackgroundWorker
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = pytest.mark.e2e
MODEL = "test-org/replicated-1.0"
SLOW = Script(words=tuple(f" w{i}" for i in range(20)), token_delay_s=0.1)  # ~2 s a job
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}


class Fleet:
    def __init__(self, stack: LocalStack, a: BackgroundWorker, b: BackgroundWorker,
                 engines: dict[str, ScriptedEngine]) -> None:
        self.stack, self.a, self.b, self.engines = stack, a, b, engines

    def generations(self, node: str) -> int:
        return sum(len(m.generations) for m in self.engines[node].loaded)

    def url(self) -> str:
        return f"{self.stack.base_url}/v1/chat/completions"


@pytest.fixture
def fleet(nats_server: EmbeddedNatsServer, tmp_path: Path, request: pytest.FixtureRequest
          ) -> Iterator[Fleet]:
    """A gateway (its own neuron serves another model) and two replicas of MODEL with one job
    slot each (or ``request.param`` slots)."""
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"")
    root = "routing-" + re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name[-40:])
    spec = ModelSpec(source=str(model_file), served_name=MODEL)
    engines = {"a-node": ScriptedEngine(SLOW), "b-node": ScriptedEngine(SLOW)}
    one_slot = NeuronSettings(max_jobs=getattr(request, "param", 1))
    gateway = GatewaySettings(replica_accept_timeout_s=0.5)
    with (
        LocalStack(nats_url=nats_server.url, root=root, engine=ScriptedEngine(),
                   models=[ModelSpec(source=str(model_file), served_name="test-org/other")],
                   gateway=gateway) as stack,
        BackgroundWorker(name="a-node", nats_url=nats_server.url, root=root,
                         engine=engines["a-node"], models=[spec], settings=one_slot) as a,
        BackgroundWorker(name="b-node", nats_url=nats_server.url, root=root,
                         engine=engines["b-node"], models=[spec], settings=one_slot) as b,
    ):
        assert stack.bus is not None
        deadline = time.monotonic() + 10
        while len(stack.bus.fleet.routable(MODEL)) < 2:
            assert time.monotonic() < deadline, "both replicas should be routable"
            time.sleep(0.05)
        yield Fleet(stack, a, b, engines)


def wait_for(condition: object, what: str, limit_s: float = 8.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_busy_replica_passes_the_job_to_the_next(fleet: Fleet) -> None:
    with httpx.stream("POST", fleet.url(), json=BODY, timeout=10) as first:
        assert first.status_code == 200
        with httpx.stream("POST", fleet.url(), json=BODY, timeout=10) as second:
            assert second.status_code == 200
            third = httpx.post(fleet.url(), json=BODY, timeout=10)
    assert (fleet.generations("a-node"), fleet.generations("b-node")) == (1, 1)
    assert third.status_code == 429
    assert third.headers["retry-after"] == "1"
    assert third.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_stale_replica_gets_no_jobs(fleet: Fleet) -> None:
    bus = fleet.stack.bus
    assert bus is not None
    fleet.b.freeze(6.0)
    wait_for(lambda: not bus.fleet.is_healthy("b-node"), "b-node goes stale after 3 beats")
    with httpx.stream("POST", fleet.url(), json=BODY, timeout=10) as held:
        assert held.status_code == 200  # on a-node, the one healthy replica
        started = time.monotonic()
        refused = httpx.post(fleet.url(), json=BODY, timeout=10)
        waited = time.monotonic() - started
    assert refused.status_code == 429, "a-node is busy and the stale b-node is not tried"
    assert waited < 5.0, f"the refusal took {waited:.1f}s (not the 30 s accept timeout)"
    wait_for(lambda: bus.fleet.is_healthy("b-node"), "b-node thaws and heartbeats again")
    assert fleet.generations("b-node") == 0


def test_a_replica_that_does_not_accept_in_time_never_runs_the_job(fleet: Fleet) -> None:
    bus = fleet.stack.bus
    assert bus is not None
    fleet.a.freeze(2.5)  # frozen, but not yet stale: the gateway still routes to it first
    time.sleep(0.2)
    started = time.monotonic()
    with httpx.stream("POST", fleet.url(), json=BODY, timeout=10) as response:
        assert response.status_code == 200
        waited = time.monotonic() - started
        text = "".join(line for line in response.iter_lines())
    assert " w19" in text
    assert 0.5 <= waited < 5.0, f"accepted elsewhere after {waited:.2f}s (a-node was tried first)"
    assert fleet.generations("b-node") == 1
    time.sleep(3.0)  # a-node thaws: the job and its cancel arrive; the job must not run
    assert fleet.generations("a-node") == 0


@pytest.mark.parametrize("fleet", [16], indirect=True)
def test_requests_arriving_together_are_spread_over_the_replicas(fleet: Fleet) -> None:
    """Each job counts on its replica from the moment it is offered, not only once accepted:
    eight requests sent at once do not all go to the replica that was idle before them."""
    def one() -> int:
        return httpx.post(fleet.url(), json={**BODY, "stream": False}, timeout=20).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: one(), range(8)))
    assert statuses == [200] * 8
    a, b = fleet.generations("a-node"), fleet.generations("b-node")
    assert a + b == 8
    assert min(a, b) >= 3, (a, b)
