"""``neuron``: the worker daemon's command line (flags, ``NEURON_*`` env), logging and signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, TextIO

import cyclopts

from bus_schema.messages import Activation
from neuron.devices import resolve_device
from neuron.errors import NeuronError
from neuron.settings import ModelSpec, NeuronSettings, default_node_name
from neuron.worker import Worker

app = cyclopts.App(
    name="neuron",
    help="Cortex worker: holds models resident and serves their jobs over NATS.",
    config=cyclopts.config.Env("NEURON_", command=False),
)
log = logging.getLogger("neuron")


def configure_logging(level: str) -> None:
    """Plain lines for journald; the only place the neuron configures logging."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class ProgressBar:
    """Draws model-load progress from activation events: a bar on a terminal, lines otherwise."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last_logged: dict[str, int] = {}

    def __call__(self, activation: Activation) -> None:
        model = activation.model or ""
        if activation.event == "progress" and activation.progress is not None:
            pct = int(activation.progress * 100)
            if self._tty:
                filled = pct * 30 // 100
                self._stream.write(f"\rloading {model} [{'#' * filled}{'.' * (30 - filled)}] "
                                   f"{pct:3d}% ")
                self._stream.flush()
            elif pct // 25 > self._last_logged.get(model, -1):
                self._last_logged[model] = pct // 25
                log.info("loading %s: %d%%", model, pct)
        elif activation.event in ("ready", "failed") and self._tty:
            self._stream.write("\r" + " " * 60 + "\r")
            self._stream.flush()


def build_settings(
    models: list[str],
    *,
    served_name: str | None,
    quant: str | None,
    name: str | None,
    nats_url: str,
    root: str,
    device: str,
    dtype: str,
    max_jobs: int,
    heartbeat_interval: float,
    hf_cache: Path | None,
) -> NeuronSettings:
    """Settings from parsed flags (kept apart from the command so it is testable).

    Raises:
        ValueError: invalid combination or value.
    """
    if served_name is not None and len(models) != 1:
        raise ValueError("--served-name applies to exactly one --model")
    specs = tuple(ModelSpec(source=m, served_name=served_name, quant=quant) for m in models)
    return NeuronSettings(
        name=name or default_node_name(),
        nats_url=nats_url,
        root=root,
        models=specs,
        device=device,
        dtype=dtype,
        max_jobs=max_jobs,
        heartbeat_interval_s=heartbeat_interval,
        hf_cache=hf_cache,
    )


@app.default
def serve(
    *,
    model: Annotated[list[str] | None, cyclopts.Parameter(name=["--model", "-m"])] = None,
    served_name: str | None = None,
    quant: str | None = None,
    name: str | None = None,
    nats_url: str = "nats://127.0.0.1:4222",
    root: str = "cortex",
    device: str = "auto",
    dtype: str = "auto",
    max_jobs: int = 16,
    heartbeat_interval: float = 1.0,
    hf_cache: Path | None = None,
    log_level: str = "info",
) -> int:
    """Join the bus and serve models.

    Parameters
    ----------
    model
        Model to load at start-up: a .gguf file, a model folder, or a hub id [scheme:]org/name.
        Repeat for several.
    served_name
        Id to serve the (single) model under; default: the hub id, or local/<name> for paths.
    quant
        GGUF quant to pick from a folder or hub repo (e.g. Q4_K_M).
    name
        Node name on the bus (default: the short host name).
    nats_url
        NATS server URL.
    root
        Subject root shared by the gateway and neurons of one fleet.
    device
        auto, cpu or cuda:N.
    dtype
        auto, bfloat16, float16 or float32.
    max_jobs
        Admission limit: jobs running or waiting on this neuron.
    heartbeat_interval
        Seconds between heartbeats.
    hf_cache
        Hugging Face hub cache directory (default: $HF_HUB_CACHE or the hub default).
    log_level
        debug, info, warning or error.
    """
    configure_logging(log_level)
    try:
        settings = build_settings(
            model or [], served_name=served_name, quant=quant, name=name, nats_url=nats_url,
            root=root, device=device, dtype=dtype, max_jobs=max_jobs,
            heartbeat_interval=heartbeat_interval, hf_cache=hf_cache,
        )
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    try:
        return asyncio.run(_serve(settings))
    except NeuronError as exc:
        log.error("%s", exc)
        return 1


async def _serve(settings: NeuronSettings) -> int:
    from neuron.engines.torch_engine import TorchEngine  # lazy: torch loads here

    engine = TorchEngine(device=resolve_device(settings.device), dtype=settings.dtype,
                         prefill_chunk_tokens=settings.prefill_chunk_tokens)
    worker = Worker(settings, engine, on_activation=ProgressBar())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    try:
        stopping = asyncio.ensure_future(stop.wait())
        prewarmed = asyncio.ensure_future(worker.ready.wait())
        await asyncio.wait({stopping, prewarmed}, return_when=asyncio.FIRST_COMPLETED)
        prewarmed.cancel()
        if worker.ready.is_set() and settings.models and not worker.residency.loaded():
            log.error("none of the start-up models could be loaded; exiting")
            stopping.cancel()
            return 1
        await stopping
    finally:
        await worker.shutdown()
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
