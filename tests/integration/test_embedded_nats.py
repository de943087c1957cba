"""The embedded nats-server the gateway starts when no NATS URL is configured."""

from __future__ import annotations

import socket
from pathlib import Path

import nats
import pytest

from cortex.embedded_nats import DEFAULT_CONFIG, EmbeddedNatsError, EmbeddedNatsServer

pytestmark = pytest.mark.integration


async def test_starts_on_a_free_port_and_accepts_clients() -> None:
    with EmbeddedNatsServer(port=None) as server:
        nc = await nats.connect(server.url)
        assert nc.max_payload == 8 * 1024 * 1024  # from nats.conf
        await nc.close()


def test_a_taken_port_falls_back_to_a_free_one() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with EmbeddedNatsServer(port=taken) as server:
            assert server.address.port not in (taken, 0)


def test_stop_is_idempotent_and_the_port_is_released() -> None:
    server = EmbeddedNatsServer(port=None)
    port = server.start().port
    server.stop()
    server.stop()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(port=None, binary=tmp_path / "no-such-nats-server")
    with pytest.raises(EmbeddedNatsError, match="binary not found"):
        server.start()


def test_a_broken_config_reports_the_server_output(tmp_path: Path) -> None:
    config = tmp_path / "broken.conf"
    config.write_text("this is { not valid")
    with pytest.raises(EmbeddedNatsError, match="did not become ready"):
        EmbeddedNatsServer(port=None, config=config, ready_timeout=3).start()


def test_the_repository_config_exists() -> None:
    assert DEFAULT_CONFIG.is_file()
