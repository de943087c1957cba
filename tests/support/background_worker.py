"""A neuron on its own thread and event loop, so a test can freeze it (as a stopped or stuck
process would be) without freezing the gateway."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from neuron.engines.base import Engine
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker


class BackgroundWorker:
    """Start with ``with BackgroundWorker(...) as worker``; `freeze` blocks its loop."""

    def __init__(
        self, *, name: str, nats_url: str, root: str, engine: Engine,
        models: Sequence[ModelSpec], settings: NeuronSettings | None = None,
    ) -> None:
        self.settings = replace(settings or NeuronSettings(), name=name, nats_url=nats_url,
                                root=root, models=tuple(models), heartbeat_interval_s=1.0)
        self.worker = Worker(self.settings, engine)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"neuron-{name}", daemon=True)

    def __enter__(self) -> BackgroundWorker:
        self._thread.start()
        if not self._started.wait(60) or self._error is not None:
            raise RuntimeError(f"neuron {self.settings.name} did not start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def freeze(self, seconds: float) -> None:
        """Block the neuron's event loop for ``seconds`` (no heartbeats, no jobs, no cancels)."""
        self._loop.call_soon_threadsafe(time.sleep, seconds)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._started.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        await self.worker.start()
        async with asyncio.timeout(60):
            await self.worker.ready.wait()
        self._started.set()
        await self._stop.wait()
        await self.worker.shutdown()
