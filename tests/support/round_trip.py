"""A real neuron (`Worker` with a scripted engine) and a real `GatewayBus` on one server, for the
tests of what a deployment's bus allows (roles, the locked bus, TLS): `scripted_pair` starts both
under the given URLs and yields the bus once the model is routable; `one_job` runs a job through
it and returns the job's events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

from bus_schema.messages import JobAccepted, JobEvent, JobFinished, JobRequest
from cortex.bus import GatewayBus
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker
from tests.support.scripted_engine import Script, ScriptedEngine

WAIT_S: Final = 10.0
"""Bound on the neuron's start and on the model becoming routable."""


@asynccontextmanager
async def scripted_pair(
    *, neuron_url: str, gateway_url: str, node: str, model: str, folder: Path,
    script: Script | None = None, nats_ca: Path | None = None,
) -> AsyncIterator[GatewayBus]:
    """Neuron ``node`` serving ``model`` (an empty file in ``folder``) and a gateway bus, each on
    its own URL (its own user), trusting ``nats_ca`` when given."""
    path = folder / "m.gguf"
    path.write_bytes(b"")
    worker = Worker(
        NeuronSettings(name=node, nats_url=neuron_url, nats_ca=nats_ca,
                       models=(ModelSpec(source=str(path), served_name=model),)),
        ScriptedEngine(script or Script()),
    )
    await worker.start()
    bus = GatewayBus(GatewaySettings(nats_ca=nats_ca), FleetView())
    try:
        async with asyncio.timeout(WAIT_S):
            await worker.ready.wait()
        await bus.connect(gateway_url)
        async with asyncio.timeout(WAIT_S):
            while not bus.fleet.routable(model):  # noqa: ASYNC110 - heartbeat arrives
                await asyncio.sleep(0.05)
        yield bus
    finally:
        await bus.close()
        await worker.shutdown()


async def one_job(bus: GatewayBus, job_id: str, model: str) -> list[JobEvent]:
    """Run a job through ``bus``: its events after the acceptance, ending with its finish."""
    stream = await bus.submit(JobRequest(job_id=job_id, model=model, prompt="hi"))
    assert isinstance(await stream.first(), JobAccepted)
    events = [e async for batch in stream.events() if isinstance(batch, list) for e in batch]
    stream.close()
    assert isinstance(events[-1], JobFinished)
    return events
