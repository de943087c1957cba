"""Liveness you can trust: a gateway or neuron whose NATS connection closes for good says so
(and its process exits non-zero so a supervisor restarts it), `/health` shows the bus and
`/ready` answers 503 without it; forged or departed nodes leave the fleet view; fleet messages
with unbounded values are refused at decoding."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from bus_schema import codec
from bus_schema.messages import MAX_LISTED, Heartbeat, ResidentModel
from cortex.bus import GatewayBus
from cortex.embedded_nats import EmbeddedNatsServer
from cortex.fleet import FORGET_AFTER_S, FleetView
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker
from tests.support.scripted_engine import ScriptedEngine
from tests.support.stack import LocalStack


async def test_a_gateway_whose_bus_closes_for_good_reports_it(nats_url: str,
                                                               subject_root: str) -> None:
    lost: list[bool] = []
    bus = GatewayBus(GatewaySettings(nats_url=nats_url, root=subject_root), FleetView(),
                     on_lost=lambda: lost.append(True))
    await bus.start()
    nc = bus._nc
    assert nc is not None
    await nc.close()  # as nats-py does after a fatal error (e.g. a payload overflow)
    await asyncio.sleep(0.1)
    assert lost == [True] and bus.lost


async def test_a_clean_gateway_shutdown_is_not_a_loss(nats_url: str, subject_root: str) -> None:
    lost: list[bool] = []
    bus = GatewayBus(GatewaySettings(nats_url=nats_url, root=subject_root), FleetView(),
                     on_lost=lambda: lost.append(True))
    await bus.start()
    await bus.close()
    await asyncio.sleep(0.1)
    assert lost == [] and not bus.lost


async def test_a_neuron_whose_bus_closes_for_good_asks_to_exit(nats_url: str,
                                                                subject_root: str) -> None:
    worker = Worker(NeuronSettings(name="liveness", nats_url=nats_url, root=subject_root),
                    ScriptedEngine())
    await worker.start()
    try:
        await worker.nc.close()
        async with asyncio.timeout(5):
            await worker.lost.wait()
    finally:
        await worker.shutdown()


def test_health_and_ready_show_a_lost_bus(nats_server: EmbeddedNatsServer, tmp_path: Path) -> None:
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"")
    with LocalStack(nats_url=nats_server.url, root="liveness-http", engine=ScriptedEngine(),
                    models=[ModelSpec(source=str(model_file), served_name="test-org/m")]) as stack:
        assert httpx.get(f"{stack.base_url}/ready", timeout=5).status_code == 200
        assert stack.loop is not None and stack.bus is not None
        nc = stack.bus._nc
        assert nc is not None
        asyncio.run_coroutine_threadsafe(nc.close(), stack.loop).result(10)
        health = httpx.get(f"{stack.base_url}/health", timeout=5)
        assert health.status_code == 200
        assert health.json()["status"] == "degraded" and health.json()["bus"] == "down"
        ready = httpx.get(f"{stack.base_url}/ready", timeout=5)
        assert (ready.status_code, ready.json()) == (503, {"ready": False})


def _beat(node: str, **fields: object) -> Heartbeat:
    return Heartbeat(node=node, seq=1, sent_at=time.time(), interval_s=1.0,
                     started_at=time.time(), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("interval", [1e-9, 1e9])
def test_heartbeats_with_unbounded_intervals_are_refused(interval: float) -> None:
    raw = msgspec.json.encode(msgspec.structs.replace(_beat("n"), interval_s=interval))
    with pytest.raises(codec.BusDecodeError):
        codec.decode_fleet_event(raw)


def test_heartbeats_listing_too_many_models_are_refused() -> None:
    models = tuple(ResidentModel(id=f"org/m{i}", status="loaded") for i in range(MAX_LISTED + 1))
    with pytest.raises(codec.BusDecodeError):
        codec.decode_fleet_event(msgspec.json.encode(_beat("n", models=models)))
    fine = codec.decode_fleet_event(msgspec.json.encode(_beat("n", models=models[:10])))
    assert isinstance(fine, Heartbeat)


def test_departed_nodes_are_forgotten() -> None:
    now = [1000.0]
    fleet = FleetView(lambda: now[0])
    fleet.apply(_beat("forged"))
    fleet.apply(_beat("real"))
    now[0] += FORGET_AFTER_S / 2
    fleet.apply(_beat("real"))
    assert [n.name for n in fleet.nodes()] == ["forged", "real"]  # stale, still remembered
    now[0] += FORGET_AFTER_S / 2 + 1
    assert [n.name for n in fleet.nodes()] == ["real"]
    assert fleet.health() == (0, 1)
