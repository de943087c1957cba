"""``neuron``: the worker daemon's command line (``neuron.toml``, ``NEURON_*`` env, flags; in that
order of strength, weakest first), logging and signals; ``neuron pull`` fetches a model."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import cyclopts

from bus_schema.messages import Activation
from neuron.config import (
    ConfigError,
    find_config,
    load_neuron_config,
    parse_bool,
    settings_from_config,
)
from neuron.devices import resolve_device
from neuron.engines.base import Engine
from neuron.errors import NeuronError
from neuron.settings import ModelSpec, NeuronSettings
from neuron.sources import pull_model
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


def _env_bool(type_: Any, tokens: Sequence[Any]) -> bool:
    """Boolean flags read from ``NEURON_*`` take what the config file does: true/1/yes/on and
    false/0/no/off (bare ``--flag`` / ``--no-flag`` never reach here)."""
    text = str(tokens[0].value)
    value = parse_bool(text)
    if value is None:
        raise ValueError(f"'{text}' is not a boolean (true/1/yes/on or false/0/no/off)")
    return value


#: ``Annotated`` metadata for ``-c/--config``.
ConfigFlag = cyclopts.Parameter(name=["--config", "-c"])


def build_settings(
    models: list[str],
    *,
    served_name: str | None = None,
    quant: str | None = None,
    name: str | None = None,
    nats_url: str | None = None,
    root: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_jobs: int | None = None,
    max_batch: int | None = None,
    heartbeat_interval: float | None = None,
    hf_cache: Path | None = None,
    prefill_chunk_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    min_free_vram_mb: int | None = None,
    use_chat_template: bool | None = None,
    memory_budget_mb: int | None = None,
    nats_credentials: Path | None = None,
    nats_ca: Path | None = None,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> NeuronSettings:
    """Settings from ``config_path`` (None: no file), ``NEURON_*`` variables of ``environ``
    (default `os.environ`) and the parsed flags (None: not given), strongest last. ``models``
    (``--model``), when any, replace the file's ``[[default_models]]``.

    Raises:
        ConfigError: the file, an override or a flag is invalid (file, key and reason).
        ValueError: an invalid combination of flags.
    """
    if served_name is not None and len(models) != 1:
        raise ValueError("--served-name applies to exactly one --model")
    given: dict[str, object | None] = {
        "name": name,
        "nats.url": nats_url,
        "nats.root": root,
        "nats.credentials": _absolute(nats_credentials),
        "nats.ca_file": _absolute(nats_ca),
        "device": device,
        "dtype": dtype,
        "max_jobs": max_jobs,
        "max_batch": max_batch,
        "heartbeat_interval_s": heartbeat_interval,
        "harness.torch.hf_cache": _absolute(hf_cache),
        "prefill_chunk_tokens": prefill_chunk_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "min_free_vram_mb": min_free_vram_mb,
        "use_chat_template": use_chat_template,
        "memory_budget_mb": memory_budget_mb,
    }
    flags = {key: value for key, value in given.items() if value is not None}
    config = load_neuron_config(config_path, environ=environ, flags=flags)
    settings = settings_from_config(
        config, base_dir=config_path.parent if config_path is not None else None, environ=environ
    )
    if models:
        specs = tuple(ModelSpec(source=m, served_name=served_name, quant=quant) for m in models)
        settings = dataclasses.replace(settings, models=specs)
    return settings


def _absolute(path: Path | None) -> str | None:
    """Path flags are relative to the working directory, not to the config file."""
    return str(path.expanduser().absolute()) if path is not None else None


@app.default
def serve(
    *,
    config: Annotated[Path | None, ConfigFlag] = None,
    model: Annotated[list[str] | None, cyclopts.Parameter(name=["--model", "-m"])] = None,
    served_name: str | None = None,
    quant: str | None = None,
    name: str | None = None,
    nats_url: str | None = None,
    nats_credentials: Path | None = None,
    nats_ca: Path | None = None,
    root: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_jobs: int | None = None,
    max_batch: int | None = None,
    heartbeat_interval: float | None = None,
    hf_cache: Path | None = None,
    prefill_chunk_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    min_free_vram_mb: int | None = None,
    use_chat_template: Annotated[bool | None, cyclopts.Parameter(converter=_env_bool)] = None,
    memory_budget_mb: int | None = None,
    log_level: str = "info",
) -> int:
    """Join the bus and serve models.

    Settings come from neuron.toml, then NEURON_<KEY> / NEURON_<TABLE>__<KEY> variables, then
    these flags. Unset flags leave the file's value (or its default).

    Parameters
    ----------
    config
        neuron.toml to read (default: ./neuron.toml when present; else defaults only).
    model
        Model to load at start-up: a .gguf file, a model folder, or a hub id [scheme:]org/name.
        Repeat for several; replaces the file's [[default_models]].
    served_name
        Id to serve the (single) model under; default: the hub id, or local/<name> for paths.
    quant
        GGUF quant to pick from a folder or hub repo (e.g. Q4_K_M).
    name
        Node name on the bus (default: the short host name).
    nats_url
        NATS server URL (default nats://127.0.0.1:4222).
    nats_credentials
        NATS .creds file.
    nats_ca
        CA certificate (PEM) to trust for a NATS server's TLS certificate (tls:// URLs).
    root
        Subject root shared by the gateway and neurons of one fleet (default cortex).
    device
        auto, cpu or cuda:N.
    dtype
        auto, bfloat16, float16 or float32.
    max_jobs
        Admission limit: jobs running or waiting on this neuron (default 64); more are refused
        as busy.
    max_batch
        Sequences one model decodes together (continuous batching; default 32).
    heartbeat_interval
        Seconds between heartbeats (default 1).
    hf_cache
        Hugging Face hub cache directory (default: $HF_HUB_CACHE, $HF_HOME/hub or the hub default).
    prefill_chunk_tokens
        Prompt tokens per forward pass while prefilling (default: 128 on a CPU, 512 on a GPU).
    max_prompt_tokens
        Longer prompts fail with prompt_too_long (default 16384).
    min_free_vram_mb
        Refuse jobs while the model's GPU has less free memory (default 1500).
    use_chat_template
        Use the model's chat template; --no-use-chat-template forces ChatML.
    memory_budget_mb
        Per device: memory the neuron may fill with models (default: half of the device).
    log_level
        debug, info, warning or error.
    """
    configure_logging(log_level)
    config_path = find_config(config)
    try:
        settings = build_settings(
            model or [], served_name=served_name, quant=quant, name=name, nats_url=nats_url,
            root=root, device=device, dtype=dtype, max_jobs=max_jobs, max_batch=max_batch,
            heartbeat_interval=heartbeat_interval, hf_cache=hf_cache,
            prefill_chunk_tokens=prefill_chunk_tokens, max_prompt_tokens=max_prompt_tokens,
            min_free_vram_mb=min_free_vram_mb, use_chat_template=use_chat_template,
            memory_budget_mb=memory_budget_mb, nats_credentials=nats_credentials,
            nats_ca=nats_ca, config_path=config_path,
        )
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    log.info("config: %s; sources: %s", config_path or "none (defaults)",
             ", ".join(f"{s.scheme}={s.endpoint}" for s in settings.sources.values()))
    try:
        return asyncio.run(_serve(settings))
    except NeuronError as exc:
        log.error("%s", exc)
        return 1


def _quantize(value: str) -> Literal["auto", "none", "fp16", "int8", "int4"]:
    match value:
        case "auto" | "none" | "fp16" | "int8" | "int4":
            return value
        case _:
            raise ValueError(f"unknown quantize {value!r}; use auto, none, fp16, int8 or int4")


def build_engines(settings: NeuronSettings) -> dict[str, Engine]:
    """The engines of the enabled harnesses (imported lazily: torch loads here)."""
    engines: dict[str, Engine] = {}
    for harness in settings.harnesses:
        match harness:
            case "torch":
                from neuron.engines.torch_engine import TorchEngine

                engines[harness] = TorchEngine(
                    device=resolve_device(settings.device), dtype=settings.dtype,
                    prefill_chunk_tokens=settings.prefill_chunk_tokens,
                    use_chat_template=settings.use_chat_template,
                    max_batch=settings.max_batch, threads=settings.torch_threads,
                    quantize=_quantize(settings.quantize),
                    prefix_cache_mb=settings.prefix_cache_mb,
                    native_kernels=settings.native_kernels)
            case "ctransformers":
                from neuron.engines.ctransformers_engine import CTransformersEngine

                engines[harness] = CTransformersEngine(
                    threads=settings.torch_threads, use_chat_template=settings.use_chat_template)
            case _:
                log.warning("harness '%s' is not available in this neuron; ignored", harness)
    return engines


async def _serve(settings: NeuronSettings) -> int:
    worker = Worker(settings, build_engines(settings), on_activation=ProgressBar())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    lost = asyncio.ensure_future(worker.lost.wait())
    try:
        stopping = asyncio.ensure_future(stop.wait())
        prewarmed = asyncio.ensure_future(worker.ready.wait())
        await asyncio.wait({stopping, prewarmed, lost}, return_when=asyncio.FIRST_COMPLETED)
        prewarmed.cancel()
        if worker.ready.is_set() and settings.models and not worker.residency.loaded():
            log.error("none of the start-up models could be loaded; exiting")
            stopping.cancel()
            return 1
        await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
    finally:
        lost.cancel()
        await worker.shutdown()
    if worker.lost.is_set():
        log.error("exiting with status 1: the bus connection was lost for good")
        return 1
    return 0


@app.command
def pull(
    model: str,
    /,
    *,
    quant: str | None = None,
    config: Annotated[Path | None, ConfigFlag] = None,
) -> int:
    """Download a model into its source's cache and print the local folder.

    Uses the sources of neuron.toml ([harness.torch.sources.*]); with HF_HUB_OFFLINE=1 only the
    cache is used.

    Parameters
    ----------
    model
        Hub id [scheme:]org/name (bare ids take harness.torch.default_source).
    quant
        GGUF quant to fetch (e.g. Q4_K_M); default: every weight file.
    config
        neuron.toml to read (default: ./neuron.toml when present).
    """
    configure_logging("warning")
    config_path = find_config(config)
    try:
        loaded = load_neuron_config(config_path)
        settings = settings_from_config(
            loaded, base_dir=config_path.parent if config_path is not None else None
        )
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    try:
        folder = pull_model(model, quant=quant, sources=settings.sources,
                            default_source=settings.default_source)
    except NeuronError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
