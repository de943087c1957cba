"""A neuron that vanishes mid-stream must not leave the client hanging: the gateway notices the
missing heartbeats and, with no other replica to resume the generation on (tests/faults has
those), ends the stream with an error event in the client's dialect."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from cortex.embedded_nats import EmbeddedNatsServer
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = pytest.mark.e2e
MODEL = "test-org/slow"


@pytest.mark.timeout(30)
def test_stream_from_a_vanished_neuron_ends_with_an_error_event(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    model_file = tmp_path / "slow.gguf"
    model_file.write_bytes(b"")
    script = Script(words=tuple(f" w{i}" for i in range(400)), token_delay_s=0.05)
    with LocalStack(
        nats_url=nats_server.url, root="e2e-faults", engine=ScriptedEngine(script),
        models=[ModelSpec(source=str(model_file), served_name=MODEL)],
        gateway=GatewaySettings(keepalive_interval_s=0.5),
    ) as stack:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": True}
        started = time.monotonic()
        lines: list[bytes] = []
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body,
                          timeout=20) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(line.encode())
                if len(lines) == 6:  # a few tokens in: the neuron drops off the bus
                    assert stack.worker is not None and stack.loop is not None
                    asyncio.run_coroutine_threadsafe(stack.worker.nc.close(), stack.loop).result()
        elapsed = time.monotonic() - started
    events = [line for line in lines if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert error["type"] == "server_error"
    assert "stopped heartbeating" in error["message"]
    assert "could not be resumed" in error["message"]
    assert elapsed < 15, f"the client waited {elapsed:.1f}s"
