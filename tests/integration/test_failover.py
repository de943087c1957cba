"""Credentials given once reach every server: a gateway and a neuron follow a failover from one
password-protected server to the next."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cortex.bus import GatewayBus
from cortex.embedded_nats import EmbeddedNatsServer
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings

pytestmark = pytest.mark.integration


async def test_reconnect_to_another_server_keeps_the_credentials(tmp_path: Path) -> None:
    config = tmp_path / "auth.conf"
    config.write_text('authorization { user: gateway, password: "s3cret" }\n')
    first = EmbeddedNatsServer(port=None, config=config)
    second = EmbeddedNatsServer(port=None, config=config)
    a, b = first.start(), second.start()
    bus = GatewayBus(GatewaySettings(root="failover"), FleetView())
    try:
        await bus.connect(f"nats://gateway:s3cret@{a.host}:{a.port},nats://{b.host}:{b.port}")
        assert bus.connected
        first.stop()
        async with asyncio.timeout(10):
            while not (bus.connected and bus._nc is not None  # noqa: ASYNC110 - polling nats-py
                       and bus._nc.connected_url is not None
                       and bus._nc.connected_url.port == b.port):
                await asyncio.sleep(0.05)
        await bus.discover()  # publishing works on the second server
    finally:
        await bus.close()
        first.stop()
        second.stop()
