"""A whole stack in one background thread: a neuron and the gateway (uvicorn on a free port),
both on the session's real nats-server. Tests drive it over HTTP with the real SDKs."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Sequence
from dataclasses import replace

import anthropic
import openai
import uvicorn

from cortex.app import create_app
from cortex.bus import GatewayBus
from cortex.fleet import FleetView
from cortex.server import gateway_config
from cortex.settings import GatewaySettings
from neuron.engines.base import Engine
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalStack:
    """Gateway + one neuron, started and stopped from synchronous test code."""

    def __init__(
        self,
        *,
        nats_url: str,
        root: str,
        engine: Engine,
        models: Sequence[ModelSpec],
        gateway: GatewaySettings | None = None,
        neuron: NeuronSettings | None = None,
        gateways: int = 1,
    ) -> None:
        """``gateways`` > 1 starts more gateways on the same bus (`base_urls`)."""
        port = free_port()
        base_gateway = gateway or GatewaySettings()
        self.gateway_settings = replace(base_gateway, host="127.0.0.1", port=port,
                                        nats_url=nats_url, root=root)
        base_neuron = neuron or NeuronSettings()
        self.neuron_settings = replace(base_neuron, name="n1", nats_url=nats_url, root=root,
                                       models=tuple(models), heartbeat_interval_s=1.0)
        self._engine = engine
        self.base_url = f"http://127.0.0.1:{port}"
        self._extra_ports = [free_port() for _ in range(gateways - 1)]
        self.base_urls = [self.base_url, *(f"http://127.0.0.1:{p}" for p in self._extra_ports)]
        self.worker: Worker | None = None
        self.bus: GatewayBus | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="local-stack", daemon=True)

    def start(self, timeout: float = 30.0) -> LocalStack:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("stack did not start in time")
        if self._error is not None:
            raise RuntimeError("stack failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The stack thread's event loop (to run coroutines on the worker or the gateway)."""
        return self._loop

    def openai_client(self) -> openai.OpenAI:
        """The real OpenAI SDK pointed at this gateway (no retries: tests see every status)."""
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)

    def anthropic_client(self) -> anthropic.Anthropic:
        """The real Anthropic SDK pointed at this gateway (no retries: tests see every status)."""
        return anthropic.Anthropic(base_url=self.base_url, api_key="unused", max_retries=0)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.worker = Worker(self.neuron_settings, self._engine)
        await self.worker.start()
        async with asyncio.timeout(60):
            await self.worker.ready.wait()
        self.bus = GatewayBus(self.gateway_settings, FleetView())
        app = create_app(self.gateway_settings, bus=self.bus)
        config = gateway_config(app, host="127.0.0.1", port=self.gateway_settings.port,
                                log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        serving = asyncio.ensure_future(self._server.serve())
        while not self._server.started:
            if serving.done():
                await serving
                raise RuntimeError("gateway exited during start-up")
            await asyncio.sleep(0.02)
        extra = []
        for extra_port in self._extra_ports:
            settings = replace(self.gateway_settings, port=extra_port,
                               gateway_id=f"{self.gateway_settings.gateway_id}-{extra_port}")
            server = uvicorn.Server(gateway_config(
                create_app(settings, bus=GatewayBus(settings, FleetView())), host="127.0.0.1",
                port=extra_port, log_level="warning", lifespan="on"))
            task = asyncio.ensure_future(server.serve())
            extra.append((server, task))
            while not server.started:
                if task.done():
                    await task
                    raise RuntimeError("an extra gateway exited during start-up")
                await asyncio.sleep(0.02)
        self._ready.set()
        await self._stop.wait()
        self._server.should_exit = True
        for server, _ in extra:
            server.should_exit = True
        await serving
        for _, task in extra:
            await task
        await self.worker.shutdown()
