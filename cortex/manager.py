"""The fleet manager: makes a requested model routable. It loads catalogued models nobody holds
(placement, eviction, ``ctl.load``), lets requests wait for a load in a bounded queue per model,
and keeps one load per model in flight.

- `FleetManager.admit` is called before a job is published: ``None`` when the model is routable
  now, else a `ColdWait` holding a place in that model's wait queue (or an `ApiError`: unknown
  model, queue full, nothing feasible).
- `ColdWait.wait` returns once a healthy node has the model loaded, starting the cold load when
  nobody is loading it yet. A load another gateway (or a neuron's pre-warm) started shows as
  ``loading`` in the fleet view within a message's time, and is waited for instead of repeated;
  two gateways with the same view also place a load on the same node, and a neuron runs a second
  load of a model it is already loading as the same load.
- Every failure reaches every waiter of that load as the same `ApiError`; a broken load (not a
  lack of room) is remembered briefly so that a burst of requests does not retry it once each.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from bus_schema.errors import ErrorCode
from bus_schema.messages import (
    ControlReply,
    JobAccepted,
    JobRequest,
    LoadRequest,
    PinRequest,
    ResidentModel,
    UnloadRequest,
)
from bus_schema.subjects import ControlVerb
from cortex.bus import BusError, GatewayBus, JobStream
from cortex.catalogue import is_feasible_on, load_spec
from cortex.config import ModelEntry
from cortex.errors import ApiError, Reason, model_not_found
from cortex.eviction import EvictionPlan, Resident, plan
from cortex.fleet import NodeView
from cortex.placement import Candidate, on_device, rank, roomiest
from cortex.routing import start_job
from cortex.settings import GatewaySettings

log = logging.getLogger(__name__)

#: How long a failed cold load answers new requests with its error before it is tried again.
FAILURE_MEMORY_S: Final = 5.0
#: Loads refused for memory are retried (after evicting) this many times (REFERENCE §5.2).
MAX_EVICTION_ROUNDS: Final = 3
_CONTROL_TIMEOUT_S: Final = 30.0
#: Failures that say the load itself is broken (remembered briefly); capacity failures are not:
#: room may appear any moment.
_BROKEN_LOADS: Final = frozenset({Reason.LOAD_FAILED, Reason.PREFLIGHT_FAILED, Reason.INTERNAL,
                                  Reason.UNSUPPORTED_ARCHITECTURE})
DEFRAG_WARNING: Final = "VRAM fragmentation threshold reached — consider restarting harness"


@dataclass(frozen=True)
class _Failure:
    error: ApiError
    until: float


class FleetManager:
    """Cold loads, their wait queues and evictions, for one gateway."""

    def __init__(self, bus: GatewayBus, settings: GatewaySettings) -> None:
        self._bus = bus
        self._settings = settings
        self._catalogue = settings.catalogue
        self._loads: dict[str, tuple[str | None, asyncio.Task[str]]] = {}
        """Cold loads this gateway runs: model → (node once placed, task returning the node)."""
        self._failures: dict[str, _Failure] = {}
        self._waiting: dict[str, int] = {}
        self._cycles: dict[str, int] = {}
        """Evictions per node (REFERENCE's ``lifecycle_cycles``)."""
        self._accessed: dict[str, float] = {}
        """When this gateway last routed each model (the neurons' ``last_used_at`` lags a beat)."""
        self._wake = asyncio.Event()
        bus.fleet.listen(self._pulse)

    # ------------------------------------------------------------------ queries

    def loading(self) -> dict[str, str | None]:
        """Cold loads this gateway has in flight: model → node (None while being placed)."""
        return {model: node for model, (node, _) in self._loads.items()}

    def feasible_on(self, entry: ModelEntry) -> list[str]:
        """Healthy nodes (with known devices) where ``entry`` may be loaded."""
        return [n.name for n in self._bus.fleet.healthy_nodes()
                if n.heartbeat.devices and is_feasible_on(entry, n.name, n.heartbeat.devices)]

    def evictions(self, node: str) -> int:
        return self._cycles.get(node, 0)

    def touch(self, model: str) -> None:
        """A job for ``model`` was routed (the LRU clock)."""
        self._accessed[model] = time.time()

    async def start(self, job: JobRequest) -> tuple[JobStream, JobAccepted]:
        """Start ``job`` on a replica of its (routable) model and advance its LRU clock.

        Raises:
            ApiError: as `cortex.routing.start_job`.
        """
        started = await start_job(self._bus, job)
        self.touch(job.model)
        return started

    # ------------------------------------------------------------------ operator actions

    async def load(self, model: str, node: str | None) -> str:
        """Make ``model`` resident (on ``node``, else where placement puts it); returns the node.

        Raises:
            ApiError: unknown node or model, or the load failed.
        """
        model = self._catalogue.resolve(model)
        self._failures.pop(model, None)  # an operator asking again means: try again
        if node is None:
            wait = await self.admit(model)
            if wait is not None:
                try:
                    await wait.wait()
                finally:
                    wait.close()
            return self._bus.fleet.routable(model)[0].node
        view = self._bus.fleet.node(node)
        if view is None or not self._bus.fleet.is_healthy(node):
            raise ApiError(Reason.NOT_FOUND, f"no healthy node named '{node}'")
        entry = self._catalogue.profile(model)
        spec = (load_spec(entry, view.heartbeat.devices, node=node) if entry is not None
                else LoadRequest(model_id=model))
        reply = await self._control(node, "load", spec, self._settings.load_timeout_s,
                                    model=model)
        if reply.status != 200 and "already loaded" not in reply.message:
            raise self._refusal(model, node, reply)
        self._bus.fleet.mark_loaded(node, reply.model or model, memory_mb=reply.memory_mb,
                                    pinned=spec.pinned)
        return node

    def _holders(self, model: str, node: str | None) -> list[str]:
        """The healthy nodes holding ``model`` (only ``node`` when given).

        Raises:
            ApiError: ``node`` is given and does not hold it.
        """
        holders = [loc.node for loc in self._bus.fleet.locations(model) if loc.healthy]
        if node is None:
            return holders
        if node not in holders:
            raise ApiError(Reason.NOT_FOUND, f"model '{model}' is not on a healthy node '{node}'")
        return [node]

    async def unload(self, model: str, node: str | None) -> list[str]:
        """Unload ``model`` from ``node`` (else from every node holding it); returns the nodes.

        Raises:
            ApiError: a node refused.
        """
        model = self._catalogue.resolve(model)
        done = []
        for holder in self._holders(model, node):
            reply = await self._control(holder, "unload", UnloadRequest(model_id=model),
                                        _CONTROL_TIMEOUT_S, model=model)
            if reply.status == 404:
                continue
            if reply.status != 200:
                raise ApiError(Reason.LOAD_FAILED,
                               f"unload of '{model}' on '{holder}' failed: {reply.message}")
            self._bus.fleet.forget_model(holder, model)
            done.append(holder)
        return done

    async def pin(self, model: str, node: str | None, *, pinned: bool) -> list[str]:
        """Pin (or unpin) ``model`` where it is resident; pinned models are never evicted there.

        Raises:
            ApiError: a node refused.
        """
        model = self._catalogue.resolve(model)
        done = []
        for holder in self._holders(model, node):
            reply = await self._control(holder, "pin", PinRequest(model_id=model, pinned=pinned),
                                        _CONTROL_TIMEOUT_S, model=model)
            if reply.status != 200:
                raise ApiError(Reason.NOT_FOUND if reply.status == 404 else Reason.LOAD_FAILED,
                               f"pin of '{model}' on '{holder}' failed: {reply.message}")
            done.append(holder)
        return done

    # ------------------------------------------------------------------ admission

    async def admit(self, model: str) -> ColdWait | None:
        """None when ``model`` is routable now; else a place in its wait queue.

        Raises:
            ApiError: unknown model (404); no healthy node can serve it (503); the queue is full
                (503/529 with Retry-After); its last load failed moments ago.
        """
        fleet = self._bus.fleet
        if fleet.routable(model):
            return None
        if not fleet.locations(model):
            await self._bus.discovered()  # right after start-up the view may still be filling
            if fleet.routable(model):
                return None
        self._check_servable(model)
        waiting = self._waiting.get(model, 0)
        if waiting >= self._settings.load_queue_depth:
            raise ApiError(Reason.MODEL_LOADING,
                           f"{waiting} requests already wait for model '{model}' to load; "
                           "retry shortly")
        self._waiting[model] = waiting + 1
        return ColdWait(self, model, time.monotonic() + self._settings.load_wait_s)

    def _check_servable(self, model: str) -> None:
        """Raise when waiting cannot help: not catalogued and nobody holds or loads it."""
        fleet = self._bus.fleet
        if model in self._loads or fleet.loading_on(model):
            return
        failure = self._failures.get(model)
        if failure is not None and failure.until > time.monotonic():
            raise failure.error
        entry = self._catalogue.profile(model)
        locations = fleet.locations(model)
        if entry is None:
            if not locations:
                raise model_not_found(model)
            healthy, _ = fleet.health()
            if not healthy:
                raise ApiError(Reason.NO_WORKER, "no healthy nodes available")
            raise ApiError(Reason.NO_WORKER, f"no healthy node currently serves model '{model}'")
        if any(loc.healthy and loc.status in ("poisoned", "recovering") for loc in locations):
            raise ApiError(Reason.NO_WORKER,
                           f"model '{model}' is recovering from a failure; retry shortly")
        if not fleet.healthy_nodes():
            raise ApiError(Reason.NO_WORKER, "no healthy nodes available")
        if not self.feasible_on(entry):
            raise ApiError(Reason.NO_WORKER,
                           f"model '{model}' is in the catalogue but no healthy neuron's topology "
                           "satisfies its constraints")

    def _leave(self, model: str) -> None:
        left = self._waiting.get(model, 0) - 1
        if left > 0:
            self._waiting[model] = left
        else:
            self._waiting.pop(model, None)

    # ------------------------------------------------------------------ waiting

    def _pulse(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def _changed(self, timeout_s: float) -> None:
        """Return on the next fleet change or load outcome, or after ``timeout_s``."""
        wake = self._wake
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await wake.wait()
        except TimeoutError:
            pass

    def _ensure_loading(self, model: str) -> asyncio.Task[str] | None:
        """This gateway's cold load of ``model``, started unless it is loading somewhere already
        (then None: the fleet view will show it loaded).

        Raises:
            ApiError: it cannot be loaded (see `admit`).
        """
        self._check_servable(model)
        running = self._loads.get(model)
        if running is not None:
            return running[1]
        if self._bus.fleet.loading_on(model):
            return None
        entry = self._catalogue.profile(model)
        if entry is None:  # only held on unhealthy nodes; `_check_servable` said why
            raise ApiError(Reason.NO_WORKER, f"no healthy node currently serves model '{model}'")
        task = asyncio.ensure_future(self._cold_load(entry))
        self._loads[model] = (None, task)
        task.add_done_callback(lambda t: self._load_done(model, t))
        return task

    def _load_done(self, model: str, task: asyncio.Task[str]) -> None:
        self._loads.pop(model, None)
        error = load_error(model, task)
        if error is not None and error.reason in _BROKEN_LOADS:
            self._failures[model] = _Failure(error, time.monotonic() + FAILURE_MEMORY_S)
        self._pulse()

    # ------------------------------------------------------------------ loading

    async def _cold_load(self, entry: ModelEntry) -> str:
        """Place, make room, load; returns the node. Raises `ApiError` on failure."""
        model = entry.id
        need = entry.vram_mb or 0
        for attempt in range(MAX_EVICTION_ROUNDS + 1):
            node = self._place(entry, need)
            self._loads[model] = (node.name, self._loads[model][1])
            await self._make_room(node, entry, need)
            spec = load_spec(entry, node.heartbeat.devices, node=node.name)
            log.info("cold-loading %s on %s (attempt %d)", model, node.name, attempt + 1)
            reply = await self._control(node.name, "load", spec, self._settings.load_timeout_s,
                                        model=model)
            if reply.status == 200 or "already loaded" in reply.message:
                self._bus.fleet.mark_loaded(node.name, model, memory_mb=reply.memory_mb,
                                            pinned=spec.pinned)
                log.info("cold-load of %s on %s done (%s MiB)", model, node.name,
                         reply.memory_mb)
                return node.name
            if reply.code is ErrorCode.INSUFFICIENT_MEMORY and attempt < MAX_EVICTION_ROUNDS:
                need = max(need, reply.memory_mb or 0)
                log.info("%s refused %s for memory (%s); making room for %d MiB", node.name,
                         model, reply.message, need)
                continue
            raise self._refusal(model, node.name, reply)
        raise AssertionError("unreachable")  # the last round raises

    def _place(self, entry: ModelEntry, need_mb: int) -> NodeView:
        """The node a cold load of ``entry`` goes to (REFERENCE §5.2 order)."""
        fleet = self._bus.fleet
        nodes = {n.name: n for n in fleet.healthy_nodes()
                 if n.heartbeat.devices and is_feasible_on(entry, n.name, n.heartbeat.devices)}
        if not nodes:
            raise ApiError(Reason.NO_WORKER,
                           f"model '{entry.id}' is in the catalogue but no healthy neuron's "
                           "topology satisfies its constraints")
        priority = self._catalogue.priority(entry.id)
        candidates = []
        for name, node in nodes.items():
            room, evictions = self._room_plan(node, need_mb, priority)
            candidates.append(Candidate(
                node=name, pinned=name in entry.pinned_on, fits_free=need_mb <= room,
                fits_after_evict=need_mb <= room or bool(evictions.victims), free_mb=room,
            ))
        return nodes[rank(candidates)[0].node]

    def _room_plan(self, node: NodeView, need_mb: int, priority: int
                   ) -> tuple[int, EvictionPlan]:
        """The room on ``node``'s roomiest device and the evictions there that fit ``need_mb``."""
        models = list(node.models.values())
        index, room = roomiest(node.heartbeat.devices, models)
        residents = [r for r, m in zip(self._residents(node), self._loaded(node), strict=True)
                     if on_device(m, index)]
        return room, plan(residents, need_mb=need_mb, free_mb=room,
                          strategy=self._settings.eviction, newcomer_priority=priority,
                          now=time.time(), min_residency_s=self._settings.min_residency_s)

    @staticmethod
    def _loaded(node: NodeView) -> list[ResidentModel]:
        return [m for m in node.models.values() if m.status == "loaded"]

    def _residents(self, node: NodeView) -> list[Resident]:
        return [
            Resident(
                model=m.id, memory_mb=m.memory_mb or 0, priority=self._catalogue.priority(m.id),
                pinned=m.pinned or node.name in getattr(self._catalogue.profile(m.id),
                                                       "pinned_on", ()),
                last_used_at=max(m.last_used_at or 0.0, self._accessed.get(m.id, 0.0)) or None,
                loaded_at=m.loaded_at,
            )
            for m in self._loaded(node)
        ]

    async def _make_room(self, node: NodeView, entry: ModelEntry, need_mb: int) -> None:
        """Evict from ``node`` until ``need_mb`` fits, by the configured strategy.

        Raises:
            ApiError: room cannot be made now (priority strategy, or the residency floor).
        """
        now = time.time()
        room, chosen = self._room_plan(node, need_mb, self._catalogue.priority(entry.id))
        if need_mb <= room:
            return
        if not chosen.victims:
            if chosen.protected_until is not None:
                wait = max(1, math.ceil(chosen.protected_until - now))
                raise ApiError(Reason.INSUFFICIENT_MEMORY,
                               f"no room for '{entry.id}' on '{node.name}': the models there "
                               f"were loaded less than {self._settings.min_residency_s:g}s ago; "
                               f"retry in {wait}s", retry_after=wait)
            if self._settings.eviction == "priority":
                raise ApiError(Reason.INSUFFICIENT_MEMORY,
                               f"no room for '{entry.id}' on '{node.name}': no resident model "
                               "there has a lower residency priority")
            log.warning("no evictable models found on %s for %s", node.name, entry.id)
            return
        for victim in chosen.victims:
            await self._evict(node.name, victim)

    async def _evict(self, node: str, model: str) -> None:
        reply = await self._control(node, "unload", UnloadRequest(model_id=model, evict=True),
                                    _CONTROL_TIMEOUT_S, model=model)
        if reply.status not in (200, 404):
            raise ApiError(Reason.LOAD_FAILED,
                           f"eviction failed: {reply.status} {reply.message}")
        self._bus.fleet.forget_model(node, model)
        cycles = self._cycles[node] = self._cycles.get(node, 0) + 1
        log.info("evicted %s from %s (eviction %d on that node)", model, node, cycles)
        threshold = self._settings.defrag_after_cycles
        if threshold and cycles >= threshold and cycles % threshold == 0:
            log.warning("%s on %s after %d evictions", DEFRAG_WARNING, node, cycles)

    async def _control(self, node: str, verb: ControlVerb,
                       request: LoadRequest | UnloadRequest | PinRequest, timeout_s: float, *,
                       model: str) -> ControlReply:
        try:
            return await self._bus.control(node, verb, request, timeout_s=timeout_s)
        except BusError as exc:
            what = "cold-load" if verb == "load" else verb
            raise ApiError(Reason.LOAD_FAILED,
                           f"{what} of '{model}' on '{node}' failed: {exc}") from None

    @staticmethod
    def _refusal(model: str, node: str, reply: ControlReply) -> ApiError:
        message = f"cold-load of '{model}' on '{node}' failed: {reply.message}"
        if reply.preflight is not None:
            return ApiError(Reason.PREFLIGHT_FAILED, message, code=reply.preflight.kind)
        if reply.code is ErrorCode.INSUFFICIENT_MEMORY:
            return ApiError(Reason.INSUFFICIENT_MEMORY, message)
        if reply.code is ErrorCode.UNSUPPORTED_ARCHITECTURE:
            return ApiError(Reason.UNSUPPORTED_ARCHITECTURE, message)
        return ApiError(Reason.LOAD_FAILED, message)


def load_error(model: str, task: asyncio.Task[str]) -> ApiError | None:
    """How a finished cold load failed, as every waiter reports it; None when it succeeded."""
    if task.cancelled():
        return ApiError(Reason.SHUTTING_DOWN, f"the load of '{model}' was cancelled")
    exc = task.exception()
    if exc is None or isinstance(exc, ApiError):
        return exc
    log.error("cold-load of %s failed unexpectedly", model, exc_info=exc)
    return ApiError(Reason.INTERNAL, f"cold-load of '{model}' failed: {exc}")


class ColdWait:
    """A request's place in one model's wait queue; `close` it however the request ends."""

    def __init__(self, manager: FleetManager, model: str, deadline: float) -> None:
        self._manager = manager
        self.model = model
        self._deadline = deadline
        self._leave = weakref.finalize(self, manager._leave, model)
        """Gives the queue place back exactly once: on `close`, or when a request that never
        ran its cleanup (a response never started) is collected."""
        self._load: asyncio.Task[str] | None = None
        """The cold load this request waits for (None: one elsewhere, or none yet)."""

    async def wait(self, timeout_s: float | None = None) -> bool:
        """True once the model is routable; False after ``timeout_s`` (for a keep-alive).

        Raises:
            ApiError: the load failed, cannot start, or the wait passed its deadline.
        """
        manager = self._manager
        fleet = manager._bus.fleet
        until = self._deadline if timeout_s is None else min(
            self._deadline, time.monotonic() + timeout_s)
        while True:
            if fleet.routable(self.model):
                return True
            if self._load is not None and self._load.done():
                error, self._load = load_error(self.model, self._load), None
                if error is not None:
                    raise error
            if self._load is None:
                self._load = manager._ensure_loading(self.model)
            left = until - time.monotonic()
            if left <= 0:
                if time.monotonic() >= self._deadline:
                    raise ApiError(Reason.MODEL_LOADING,
                                   f"model '{self.model}' is still loading after "
                                   f"{manager._settings.load_wait_s:g}s; retry shortly")
                return False
            await manager._changed(left)

    async def until_ready(self, disconnected: Callable[[], Awaitable[None]]) -> None:
        """Wait for the model (for a non-streaming request).

        Raises:
            ApiError: as `wait`, or the client went away first (nobody reads that answer).
        """
        waiting = asyncio.ensure_future(self.wait())
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiting.done():
                waiting.cancel()
        if not waiting.done() or waiting.cancelled():
            raise ApiError(Reason.CANCELLED, "the client went away while the model loaded")
        waiting.result()

    def close(self) -> None:
        self._leave()
