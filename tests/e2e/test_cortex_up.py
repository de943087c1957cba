"""`cortex up` as a user runs it: one command brings up NATS, a neuron and the gateway; the real
OpenAI SDK talks to it; Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.stack import free_port
from tests.support.tiny_models import TinyModel

pytestmark = pytest.mark.e2e


def wait_until_serving(base_url: str, proc: subprocess.Popen[str], timeout: float) -> str:
    """Poll /v1/models until a loaded model shows up; return its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"cortex up exited early with {proc.returncode}")
        try:
            data = httpx.get(f"{base_url}/v1/models", timeout=2).json()["data"]
        except (httpx.HTTPError, ValueError):
            data = []
        loaded = [m["id"] for m in data if m["loaded"]]
        if loaded:
            return str(loaded[0])
        time.sleep(0.2)
    raise AssertionError("cortex up did not serve a model in time")


@pytest.fixture
def cortex_up(tiny_model: TinyModel) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex", "up", "--model", str(tiny_model.gguf_path),
         "--served-name", "tiny/llama", "--port", str(port), "--nats-port", str(free_port()),
         "--device", "cpu"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.timeout(120)
def test_cortex_up_serves_and_stops_cleanly_on_ctrl_c(
    cortex_up: tuple[str, subprocess.Popen[str]],
) -> None:
    base_url, proc = cortex_up
    model = wait_until_serving(base_url, proc, timeout=90)
    assert model == "tiny/llama"
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], stream=True,
            max_tokens=8, temperature=0,
        )
        chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=40)
    assert proc.returncode == 0, output
    assert "ready: http://127.0.0.1" in output
    assert "embedded NATS server stopped" in output
    assert "left the bus" in output  # the neuron drained before the server went away


def test_cortex_up_without_a_model_file_fails_with_a_clear_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cortex", "up", "--model", str(tmp_path / "missing.gguf"),
         "--port", str(free_port()), "--nats-port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "does not exist" in result.stderr
