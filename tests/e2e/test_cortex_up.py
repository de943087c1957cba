"""`cortex up` as a user runs it: one command brings up NATS, a neuron and the gateway; the real
OpenAI SDK talks to it; Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.stack import free_port
from tests.support.stack_output import Output
from tests.support.tiny_models import TinyModel

pytestmark = pytest.mark.e2e


@pytest.fixture
def cortex_up(tiny_model: TinyModel) -> Iterator[tuple[str, subprocess.Popen[str], Output]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex", "up", "--model", str(tiny_model.gguf_path),
         "--served-name", "tiny/llama", "--port", str(port), "--nats-port", str(free_port()),
         "--device", "cpu"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = Output(proc)
    try:
        yield f"http://127.0.0.1:{port}", proc, output
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        output.text()  # the reader has seen end-of-file
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.timeout(120)
def test_cortex_up_serves_and_stops_cleanly_on_ctrl_c(
    cortex_up: tuple[str, subprocess.Popen[str], Output],
) -> None:
    base_url, proc, output = cortex_up
    assert output.ready.wait(timeout=90), output.text()
    assert f"ready: {base_url}/v1 serving tiny/llama" in "".join(output.lines)
    models = httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"]
    assert [(m["id"], m["loaded"]) for m in models] == [("tiny/llama", True)]
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="tiny/llama", messages=[{"role": "user", "content": "hello"}], stream=True,
            max_tokens=8, temperature=0,
        )
        chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=40) == 0, output.text()
    text = output.text()
    assert "embedded NATS server stopped" in text
    assert "left the bus" in text  # the neuron drained before the server went away


def test_cortex_up_without_a_model_file_fails_with_a_clear_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cortex", "up", "--model", str(tmp_path / "missing.gguf"),
         "--port", str(free_port()), "--nats-port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "does not exist" in result.stderr
