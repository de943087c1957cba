"""Fixtures of the gateway bus tests against a fake neuron: a started gateway bus, and a
`tests.support.fake_neuron.FakeNeuron` serving the test module's ``MODEL`` as node ``NODE``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest

from cortex.bus import GatewayBus
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings
from tests.support.fake_neuron import FakeNeuron


@pytest.fixture
async def bus(nats_url: str, subject_root: str) -> AsyncIterator[GatewayBus]:
    gateway = GatewayBus(GatewaySettings(nats_url=nats_url, root=subject_root,
                                         discover_wait_s=0.01), FleetView())
    await gateway.start()
    yield gateway
    await gateway.close()


@pytest.fixture
async def neuron(nats_url: str, subject_root: str,
                 request: pytest.FixtureRequest) -> AsyncIterator[FakeNeuron]:
    fake = FakeNeuron(await nats.connect(nats_url), subject_root, model=request.module.MODEL,
                      node=request.module.NODE)
    await fake.start()
    yield fake
    await fake.nc.close()
