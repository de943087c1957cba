"""Which models this neuron holds, and their lifecycle: resolve → admit → load → unload.

Each resident model owns a single-thread executor: loading and all generation for that model run
there, never on the event loop. Lifecycle changes are reported as `Lifecycle` events to a sink (the
worker publishes them on the bus and the CLI draws progress bars from them); ``ready`` is the
worker's to report, once the model's job subjects are subscribed.

A load is admitted against the device's memory budget (`neuron.memory`) after resolving the files
and before reading any weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bus_schema.messages import ActivationEventKind, Device, ResidentModel
from neuron.devices import discover_devices
from neuron.engines.base import Engine, LoadedModel
from neuron.errors import (
    AlreadyLoadedError,
    InsufficientMemoryError,
    ModelNotLoadedError,
    NeuronError,
)
from neuron.memory import MemoryBook, estimate_mb
from neuron.preflight import preflight_hub, preflight_local
from neuron.settings import ModelSpec, Source
from neuron.sources import ResolvedModel, default_served_name, resolve_model, select_source

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class Lifecycle:
    """A change in one model's life on this neuron (the worker publishes it as an `Activation`
    and the CLI draws progress bars from it)."""

    event: ActivationEventKind
    model: str
    progress: float | None = None
    """In [0, 1] while loading."""
    message: str = ""


LifecycleSink = Callable[[Lifecycle], None]
_PROGRESS_MIN_STEP = 0.02
_PROGRESS_MIN_INTERVAL_S = 0.25


@dataclass(eq=False)
class ModelSlot:
    """One model on this neuron, loading or loaded."""

    model_id: str
    spec: ModelSpec
    executor: ThreadPoolExecutor
    source: str | None = None
    model: LoadedModel | None = None
    status: str = "loading"
    progress: float = 0.0
    running: int = 0
    waiting: int = 0
    pinned: bool = False
    memory_mb: int = 0
    """What this model is accounted at on its device (`neuron.memory`)."""
    device_index: int = 0
    loaded_at: float | None = None
    last_used_at: float | None = None
    ready_message: str = ""

    def require(self) -> LoadedModel:
        """The loaded model.

        Raises:
            ModelNotLoadedError: still loading, or unloaded.
        """
        if self.model is None or self.status != "loaded":
            raise ModelNotLoadedError(self.model_id)
        return self.model

    def snapshot(self) -> ResidentModel:
        info = self.model.info if self.model is not None else None
        return ResidentModel(
            id=self.model_id,
            status="loaded" if self.status == "loaded" else "loading",
            source=self.source,
            engine=info.engine if info else "",
            format=info.format if info else "",
            context_length=info.context_length if info else None,
            memory_mb=self.memory_mb,
            device=info.device if info else "",
            pinned=self.pinned,
            jobs_running=self.running,
            jobs_waiting=self.waiting,
            load_progress=None if self.status == "loaded" else round(self.progress, 3),
            loaded_at=self.loaded_at,
            last_used_at=self.last_used_at,
            devices=(self.device_index,),
        )


def served_id(spec: ModelSpec) -> str:
    """The canonical id a spec will be served under, known before resolving it."""
    return spec.served_name or default_served_name(spec.source)


class Residency:
    """The set of models this neuron holds."""

    def __init__(
        self,
        engines: Mapping[str, Engine],
        sink: LifecycleSink,
        *,
        hf_cache: Path | None = None,
        sources: Mapping[str, Source] | None = None,
        default_source: str = "huggingface",
        memory: MemoryBook | None = None,
        device: str = "cpu",
        devices: Callable[[], tuple[Device, ...]] = discover_devices,
    ) -> None:
        """Hold models for ``engine`` on ``device`` (``cpu`` / ``cuda:N``), within ``memory``'s
        budgets (default: half of the device); ``devices`` reads the host's devices now."""
        self._engines = engines
        self._sink = sink
        self._slots: dict[str, ModelSlot] = {}
        self._hf_cache = hf_cache
        self._sources = sources
        self._default_source = default_source
        self._memory = memory or MemoryBook(budget_mb=None)
        self._device = device
        self._devices = devices

    def used_mb(self) -> dict[int, int]:
        """Memory accounted to models (loading ones included) per device index."""
        used: dict[int, int] = {}
        for slot in self._slots.values():
            used[slot.device_index] = used.get(slot.device_index, 0) + slot.memory_mb
        return used

    def devices(self) -> tuple[Device, ...]:
        """The host's devices with this neuron's budgets and model memory (for heartbeats)."""
        return self._memory.report(self._devices(), self.used_mb())

    def get(self, model_id: str) -> ModelSlot | None:
        return self._slots.get(model_id)

    def loaded(self) -> list[ModelSlot]:
        return [s for s in self._slots.values() if s.status == "loaded"]

    def snapshot(self) -> tuple[ResidentModel, ...]:
        return tuple(s.snapshot() for s in sorted(self._slots.values(), key=lambda s: s.model_id))

    async def load(self, spec: ModelSpec, *, memory_mb: int | None = None) -> ModelSlot:
        """Resolve, admit and load ``spec``; returns when the weights are resident (the caller
        reports ``ready``). ``memory_mb`` is the gateway's estimate of its size.

        Raises:
            InsufficientMemoryError: it does not fit the device's budget (nothing was read).
            NeuronError: resolving or loading failed (already reported as ``failed``).
        """
        model_id = served_id(spec)
        if model_id in self._slots:
            raise AlreadyLoadedError(model_id)
        slot = ModelSlot(
            model_id=model_id,
            spec=spec,
            pinned=spec.pinned,
            executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{model_id}"),
        )
        self._slots[model_id] = slot
        loop = asyncio.get_running_loop()
        self._sink(Lifecycle("queued", model_id, 0.0, spec.source))
        started = time.monotonic()
        try:
            resolved: ResolvedModel = await loop.run_in_executor(
                slot.executor, self._resolve, spec, model_id
            )
            slot.source = resolved.source
            need = max(estimate_mb(resolved.files), memory_mb or 0)
            admission = self._memory.admit(await asyncio.to_thread(self._devices), self._device,
                                           need, self.used_mb())
            if admission.refusal is not None:
                raise InsufficientMemoryError(admission.refusal, need_mb=need)
            slot.memory_mb, slot.device_index = need, admission.device
            self._sink(Lifecycle("started", model_id, 0.0, str(resolved.files.weights[0])))
            progress = _ProgressRelay(loop, slot, self._sink)
            slot.model = await loop.run_in_executor(
                slot.executor, self._engine(spec).load, resolved.files, progress
            )
        except BaseException as exc:  # reported as `failed`, then re-raised
            del self._slots[model_id]
            slot.executor.shutdown(wait=False)
            self._sink(Lifecycle("failed", model_id, None, str(exc) or type(exc).__name__))
            raise
        slot.status = "loaded"
        slot.progress = 1.0
        slot.loaded_at = time.time()
        info = slot.model.info
        slot.memory_mb = max(slot.memory_mb, -(-info.memory_bytes // (1024 * 1024)))
        slot.ready_message = (
            f"{info.architecture} {info.format} {info.parameters / 1e6:.0f}M params on "
            f"{info.device} ({info.dtype}, {slot.memory_mb} MiB) in "
            f"{time.monotonic() - started:.1f}s"
        )
        return slot

    def _engine(self, spec: ModelSpec) -> Engine:
        """The engine for ``spec``'s harness.

        Raises:
            NeuronError: this neuron has no such engine.
        """
        engine = self._engines.get(spec.harness)
        if engine is None:
            raise NeuronError(f"unknown harness: {spec.harness}")
        return engine

    def _resolve(self, spec: ModelSpec, model_id: str) -> ResolvedModel:
        """Preflight (one listing, no download: REFERENCE §6.6), then fetch or find the files.

        Raises:
            PreflightError: the repo or folder cannot serve this load spec.
            ModelSourceError: resolving failed.
        """
        path = Path(spec.source).expanduser()
        if path.exists():
            preflight_local(spec.source, path, quant=spec.quant,
                            tensor_parallel=spec.tensor_parallel)
        elif not spec.source.startswith(("/", "./", "../", "~")):
            source_id, source = select_source(spec.source, sources=self._sources,
                                              default_source=self._default_source,
                                              cache_dir=self._hf_cache)
            preflight_hub(str(source_id), source_id.repo_path(), quant=spec.quant,
                          tensor_parallel=spec.tensor_parallel, endpoint=source.endpoint,
                          token=source.token, cache_dir=source.cache_dir)
        return resolve_model(
            spec.source, served_name=model_id, quant=spec.quant, cache_dir=self._hf_cache,
            sources=self._sources, default_source=self._default_source,
        )

    async def unload(self, model_id: str, *, event: ActivationEventKind = "unloaded") -> None:
        """Release a model (after the jobs on its thread finish).

        Raises:
            ModelNotLoadedError: not held here.
        """
        slot = self._slots.pop(model_id, None)
        if slot is None:
            raise ModelNotLoadedError(model_id)
        slot.status = "unloaded"
        model, slot.model = slot.model, None
        if model is not None:
            await asyncio.get_running_loop().run_in_executor(slot.executor, model.close)
        slot.executor.shutdown(wait=False)
        self._sink(Lifecycle(event, model_id, None, ""))

    async def close(self) -> None:
        for model_id in list(self._slots):
            await self.unload(model_id)


class _ProgressRelay:
    """Called on the loading thread; forwards throttled progress to the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, slot: ModelSlot, sink: LifecycleSink
    ) -> None:
        self._loop = loop
        self._slot = slot
        self._sink = sink
        self._last_value = 0.0
        self._last_time = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        now = time.monotonic()
        if fraction < 1.0 and (
            fraction - self._last_value < _PROGRESS_MIN_STEP
            or now - self._last_time < _PROGRESS_MIN_INTERVAL_S
        ):
            return
        self._last_value, self._last_time = fraction, now
        self._loop.call_soon_threadsafe(self._emit, fraction, message)

    def _emit(self, fraction: float, message: str) -> None:
        self._slot.progress = fraction
        self._sink(Lifecycle("progress", self._slot.model_id, fraction, message))
