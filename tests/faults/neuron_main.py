"""A neuron as a real process for the fault tests: ``python -m tests.faults.neuron_main SPEC``,
with SPEC a JSON object (name, nats_url, root, models: [[source, served name], ...]).

Settings are built here explicitly (not from flags) for exact greedy comparisons: float32 weights
and activations, not quantized (in bf16 or with int8 weights, a prompt's prefill and the decoding
of the same tokens round differently, so even one engine does not continue a generation
token-exactly from its own prefix), no default repetition penalty (a continuation's penalty
window starts empty), one torch thread (two neurons share the test machine). SIGTERM drains and
exits; SIGKILL and SIGSTOP are what the tests send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Mapping

from neuron.cli import build_engines
from neuron.engines.base import Engine
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker


def settings_from(spec: str) -> NeuronSettings:
    given = json.loads(spec)
    return NeuronSettings(
        name=given["name"], nats_url=given["nats_url"], root=given["root"],
        models=tuple(ModelSpec(source=source, served_name=served)
                     for source, served in given["models"]),
        device="cpu", dtype="float32", quantize="none", default_repetition_penalty=1.0,
        torch_threads=1,
        harnesses=("torch",), heartbeat_interval_s=1.0, drain_timeout_s=2.0,
    )


async def serve(settings: NeuronSettings, engines: Engine | Mapping[str, Engine]) -> None:
    """Until SIGTERM, then drain."""
    worker = Worker(settings, engines)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start()
    try:
        await stop.wait()
    finally:
        await worker.shutdown()


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("nats").setLevel(logging.WARNING)
    settings = settings_from(sys.argv[1])
    asyncio.run(serve(settings, build_engines(settings)))


if __name__ == "__main__":
    main()
