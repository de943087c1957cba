"""`nats micro ls/info/stats` see every neuron and gateway: their $SRV replies validate against the
schemas the nats CLI checks (tests/data/micro, from nats-io/jsm.go)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import nats
import pytest
from nats.aio.client import Client
from referencing import Registry, Resource

from bus_schema.service import GATEWAY_SERVICE, NEURON_SERVICE
from cortex.bus import GatewayBus
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker
from tests.support.scripted_engine import Script, ScriptedEngine

pytestmark = pytest.mark.integration
Schema = bool | Mapping[str, Any]
SCHEMAS = Path(__file__).resolve().parent.parent / "data" / "micro"


def validator(name: str) -> jsonschema.Draft7Validator:
    resources: list[tuple[str, Resource[Schema]]] = [
        (f"https://nats.io/schemas/micro/v1/{path.name}",
         Resource.from_contents(json.loads(path.read_text())))
        for path in SCHEMAS.glob("*.json")
    ]
    registry: Registry[Schema] = Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / name).read_text())
    return jsonschema.Draft7Validator(schema, registry=registry)


async def gather_replies(nc: Client, subject: str, expected: int) -> list[dict[str, object]]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    replies: list[dict[str, object]] = []
    async with asyncio.timeout(5):
        while len(replies) < expected:
            replies.append(json.loads((await sub.next_msg(timeout=3)).data))
    await sub.unsubscribe()
    return replies


@pytest.fixture
async def fleet(
    nats_url: str, subject_root: str, tmp_path: Path
) -> AsyncIterator[tuple[Worker, GatewayBus]]:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    worker = Worker(
        NeuronSettings(name="micro-n1", nats_url=nats_url, root=subject_root,
                       models=(ModelSpec(source=str(model), served_name="a/b"),)),
        ScriptedEngine(Script()),
    )
    await worker.start()
    bus = GatewayBus(GatewaySettings(root=subject_root), FleetView())
    await bus.connect(nats_url)
    yield worker, bus
    await bus.close()
    await worker.shutdown()


@pytest.mark.parametrize(("verb", "schema"), [("PING", "ping_response.json"),
                                              ("INFO", "info_response.json"),
                                              ("STATS", "stats_response.json")])
async def test_service_replies_validate_against_the_nats_cli_schemas(
    nats_url: str, fleet: tuple[Worker, GatewayBus], verb: str, schema: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        neuron = await gather_replies(nc, f"$SRV.{verb}.{NEURON_SERVICE}", 1)
        gateway = await gather_replies(nc, f"$SRV.{verb}.{GATEWAY_SERVICE}", 1)
    finally:
        await nc.close()
    check = validator(schema)
    for reply in (*neuron, *gateway):
        errors = [e.message for e in check.iter_errors(reply)]
        assert errors == [], errors
    worker, _ = fleet
    assert neuron[0]["name"] == NEURON_SERVICE
    assert neuron[0]["metadata"] == {"node": worker.settings.name, "root": worker.settings.root,
                                     "engine": "torch"}
