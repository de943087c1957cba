"""The neuron's bus service: joins NATS, loads its models, takes jobs, reports its state.

- For each resident model it subscribes ``cortex.job.<model>`` in queue group ``neurons`` (one
  neuron takes each job) and ``cortex.node.<node>.job.<model>`` (directed jobs). Each job runs in
  its own task; the subscription callback returns at once.
- It publishes a `Heartbeat` every ``heartbeat_interval_s`` and answers ``cortex.fleet.discover``
  with one immediately; model lifecycle changes go out as `Activation` events when they happen.
- Control requests arrive on ``cortex.node.<node>.ctl.<verb>``.
- Shutdown drains: stop taking jobs, let running ones finish (bounded), then drain the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import nats
import nats.micro
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import Service

from bus_schema import codec
from bus_schema.connection import parse_nats_urls
from bus_schema.drops import Drops
from bus_schema.errors import ErrorCode
from bus_schema.messages import (
    MAX_JOB_ID,
    MAX_LISTED,
    Activation,
    ActivationEventKind,
    ActivationState,
    FailedActivation,
    Heartbeat,
    JobEvent,
    JobFailed,
    JobRequest,
)
from bus_schema.service import NEURON_SERVICE, package_version, service_version
from bus_schema.subjects import (
    JOB_QUEUE_GROUP,
    Headers,
    activation_subject,
    discover_subject,
    heartbeat_subject,
    job_subject,
    model_from_job_subject,
    node_job_subject,
)
from neuron.admission import Admission
from neuron.control import ControlPlane
from neuron.devices import host_info, resolve_device
from neuron.engines.base import Engine
from neuron.errors import (
    AlreadyLoadedError,
    NeuronError,
)
from neuron.memory import MemoryBook
from neuron.residency import Lifecycle, Residency, served_id
from neuron.runner import JobRunner
from neuron.settings import ModelSpec, NeuronSettings

log = logging.getLogger(__name__)

#: Receives every activation this worker publishes (the CLI draws progress bars from them).
ActivationListener = Callable[[Activation], None]


class Worker:
    """One neuron on the bus."""

    def __init__(
        self,
        settings: NeuronSettings,
        engines: Engine | Mapping[str, Engine],
        *,
        on_activation: ActivationListener | None = None,
    ) -> None:
        """A neuron running ``engines`` (by harness name; one engine serves its own name)."""
        self.settings = settings
        self._engines: Mapping[str, Engine] = (
            engines if isinstance(engines, Mapping) else {engines.name: engines})
        self._on_activation = on_activation
        self._nc: NatsClient | None = None
        self._service: Service | None = None
        self._residency = Residency(
            self._engines, self._lifecycle, hf_cache=settings.hf_cache, sources=settings.sources,
            default_source=settings.default_source,
            memory=MemoryBook(budget_mb=settings.memory_budget_mb),
            device=resolve_device(settings.device),
        )
        self._loads: dict[str, asyncio.Future[None]] = {}
        """Loads in progress by model id: a second load of the same model waits for the first."""
        self._admission = Admission(settings)
        self.drops = Drops(log)
        """Bad bus messages this neuron dropped (its heartbeat carries the count)."""
        self._runner = JobRunner(settings, self._admission)
        self._control = ControlPlane(self, reply=self._reply, spawn=self._spawn)
        self._job_subs: dict[str, list[Subscription]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._started_at = time.time()
        self._draining = False
        self._pending: list[str] = [m.source for m in settings.models]
        self._in_progress: list[str] = []
        self._completed: list[str] = []
        self._failed: list[FailedActivation] = []
        self.ready = asyncio.Event()
        """Set once every start-up model has been loaded or has failed."""
        self.lost = asyncio.Event()
        """Set if the NATS connection closes for good outside a shutdown: the process should
        exit non-zero so its supervisor restarts it."""
        self._stopping = False

    @property
    def residency(self) -> Residency:
        return self._residency

    @property
    def jobs_running(self) -> int:
        """Jobs in progress on this neuron (what its heartbeat reports)."""
        return self._admission.running

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("worker not connected")
        return self._nc

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain. Joins the bus before loading models."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.shutdown()

    async def start(self) -> None:
        """Connect, subscribe, start heartbeats, then load the start-up models in the background."""
        s = self.settings
        endpoint = parse_nats_urls(s.nats_url)
        credentials = {"user_credentials": str(s.nats_credentials)} if s.nats_credentials else {}
        self._nc = await nats.connect(
            **endpoint.connect_options(ca_file=s.nats_ca),
            **credentials,
            name=f"neuron:{s.name}",
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
        )
        self._service = await nats.micro.add_service(
            self.nc,
            name=NEURON_SERVICE,
            version=service_version(package_version()),
            description=f"Cortex neuron '{s.name}': runs jobs for its resident models",
            metadata={"node": s.name, "root": s.root, "engine": ",".join(sorted(self._engines))},
        )
        await self.nc.subscribe(discover_subject(root=s.root), cb=self._handle_discover)
        await self.nc.subscribe(f"{s.root}.node.{s.name}.ctl.*", cb=self._control.handle)
        await self._confirm_subscriptions()  # control and discovery answer from the start
        self._spawn(self._heartbeat_loop())
        self._spawn(self._prewarm(s.models))
        log.info("neuron %s joined the bus at %s (root %s)", s.name, endpoint.redacted(), s.root)

    async def shutdown(self) -> None:
        """Stop taking jobs, finish running ones within the drain timeout, leave the bus."""
        if self._nc is None:
            return
        self._stopping = True
        self._activation("stopping", None, None, "")
        await self._stop_taking_jobs()
        if not await self._admission.wait_idle(self.settings.drain_timeout_s):
            log.warning("jobs still running after %.0fs; cancelling them",
                        self.settings.drain_timeout_s)
        self._runner.cancel_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._service is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._service.stop()
        with contextlib.suppress(nats.errors.Error):
            await self.nc.drain()
        self._nc = None
        await self._residency.close()
        log.info("neuron %s left the bus", self.settings.name)

    async def _stop_taking_jobs(self) -> None:
        """Leave every job subject: new jobs go to other neurons (or get no-responders)."""
        self._draining = True
        for subs in self._job_subs.values():
            for sub in subs:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        self._job_subs.clear()
        await self._publish_heartbeat()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ models

    async def _prewarm(self, specs: tuple[ModelSpec, ...]) -> None:
        for spec in specs:
            self._pending.remove(spec.source)
            self._in_progress.append(spec.source)
            try:
                await self.load(spec)
            except NeuronError as exc:
                log.error("start-up model %s failed to load: %s", spec.source, exc)
                self._failed.append(FailedActivation(model_id=spec.source[:512],
                                                     error=str(exc)[:4000]))
            else:
                self._completed.append(spec.source)
            finally:
                self._in_progress.remove(spec.source)
        self.ready.set()
        await self._publish_heartbeat()

    async def load(self, spec: ModelSpec, *, memory_mb: int | None = None) -> str:
        """Load a model and start serving it; returns its canonical id once its job subjects
        are subscribed (then ``ready`` goes out). A load of a model already loading here waits
        for that load (single flight) and then reports it as already loaded.

        Raises:
            AlreadyLoadedError: it is resident already (or was just loaded by a concurrent call).
            InsufficientMemoryError: it does not fit the memory budget.
            NeuronError: resolving or loading failed.
        """
        model_id = served_id(spec)
        pending = self._loads.get(model_id)
        if pending is not None:
            await asyncio.shield(pending)
            raise AlreadyLoadedError(model_id)
        if self._residency.get(model_id) is not None:
            raise AlreadyLoadedError(model_id)
        done = asyncio.get_running_loop().create_future()
        self._loads[model_id] = done
        try:
            await self._load(spec, memory_mb)
        except BaseException as exc:  # handed to concurrent waiters, then re-raised
            done.set_exception(exc)
            done.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            done.set_result(None)
        finally:
            del self._loads[model_id]
        return model_id

    async def _load(self, spec: ModelSpec, memory_mb: int | None) -> None:
        slot = await self._residency.load(spec, memory_mb=memory_mb)
        s = self.settings
        if self._draining:
            self._activation("ready", slot.model_id, 1.0, slot.ready_message)
            return  # resident, but this neuron takes no new jobs
        subs = [
            await self.nc.subscribe(
                job_subject(slot.model_id, root=s.root), queue=JOB_QUEUE_GROUP, cb=self._handle_job
            ),
            await self.nc.subscribe(
                node_job_subject(s.name, slot.model_id, root=s.root), cb=self._handle_job
            ),
        ]
        self._job_subs[slot.model_id] = subs
        await self._confirm_subscriptions()  # interest is registered before anyone hears "ready"
        self._activation("ready", slot.model_id, 1.0, slot.ready_message)
        await self._publish_heartbeat()

    async def _confirm_subscriptions(self) -> None:
        """Return once the server has every subscription made so far.

        nats-py writes a flush's PING straight to the socket, ahead of commands still queued for
        its flusher task, so one PONG does not prove that earlier SUBs reached the server (a job
        published right after could get no-responders). The first round trip lets the flusher
        write them; the second proves the server has processed them.
        """
        await self.nc.flush()
        await self.nc.flush()

    async def unload(self, model_id: str, *, evict: bool = False) -> None:
        """Stop serving a model and release it (``evict``: reported as ``evicted``).

        Raises:
            ModelNotLoadedError: not held here.
        """
        for sub in self._job_subs.pop(model_id, []):
            await sub.unsubscribe()
        await self._residency.unload(model_id, event="evicted" if evict else "unloaded")
        await self._publish_heartbeat()

    # ------------------------------------------------------------------ jobs

    async def _handle_job(self, msg: Msg) -> None:
        try:
            job = codec.decode_job_request(msg.data)
        except codec.BusDecodeError as exc:
            self.drops.drop("job", msg.subject, str(exc))
            await self._refuse_unreadable(msg, exc)
            return
        if model_from_job_subject(msg.subject, root=self.settings.root) != job.model:
            # the subscription is what this neuron serves: a job naming another model is forged
            self.drops.drop("job", msg.subject, f"names model {job.model!r}, not its subject's")
            return
        if not msg.reply:
            self.drops.drop("job", msg.subject, f"job {job.job_id!r} has no reply subject")
            return
        self._spawn(self._run_job(job, msg.reply))

    async def _refuse_unreadable(self, msg: Msg, exc: codec.BusDecodeError) -> None:
        """Answer a job this neuron cannot read with a `JobFailed`, when its headers say where and
        for which job (a gateway of another protocol version then fails fast, not after its
        accept timeout)."""
        job_id = msg.headers.get(Headers.JOB_ID) if msg.headers else None
        if not msg.reply or not job_id or len(job_id) > MAX_JOB_ID:
            return
        failed = JobFailed(job_id=job_id, seq=0, code=ErrorCode.INVALID_REQUEST,
                           message=f"neuron '{self.settings.name}' cannot read this job: "
                                   f"{str(exc)[:200]}")
        await self.nc.publish(msg.reply, codec.encode(failed),
                              headers={Headers.JOB_ID: job_id, Headers.NODE: self.settings.name})

    async def _run_job(self, job: JobRequest, reply: str) -> None:
        headers = {Headers.JOB_ID: job.job_id, Headers.NODE: self.settings.name}
        nc = self.nc
        slot = self._residency.get(job.model)
        if slot is not None:
            slot.last_used_at = time.time()

        async def publish(event: JobEvent) -> None:
            await nc.publish(reply, codec.encode(event), headers=headers)

        await self._runner.run(job, slot, publish)

    # ------------------------------------------------------------------ fleet state

    def heartbeat(self) -> Heartbeat:
        """This neuron's full state now, numbered as the last heartbeat sent (a query: it
        changes nothing; `_beat` numbers the next one)."""
        activation = ActivationState(
            state="pre_warming" if not self.ready.is_set() else "ready",
            pending=tuple(self._pending),
            in_progress=tuple(self._in_progress),
            completed=tuple(self._completed),
            failed=tuple(self._failed),
        )
        return Heartbeat(
            node=self.settings.name,
            seq=self._seq,
            sent_at=time.time(),
            interval_s=self.settings.heartbeat_interval_s,
            started_at=self._started_at,
            version=package_version(),
            host=host_info(),
            devices=self._residency.devices(),
            models=self._residency.snapshot(),
            activation=activation,
            jobs_running=self._admission.running,
            max_jobs=self.settings.max_jobs,
            dropped_messages=self.drops.total,
            draining=self._draining,
            jobs=jobs if len(jobs := self._runner.job_ids) <= MAX_LISTED else None,
        )

    def _beat(self) -> Heartbeat:
        """The next heartbeat to send."""
        self._seq += 1
        return self.heartbeat()

    async def _publish_heartbeat(self) -> None:
        if self._nc is None or self._nc.is_closed:
            return
        await self._nc.publish(
            heartbeat_subject(self.settings.name, root=self.settings.root),
            codec.encode(self._beat()),
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._publish_heartbeat()
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _handle_discover(self, msg: Msg) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, codec.encode(self._beat()))

    def _lifecycle(self, change: Lifecycle) -> None:
        self._activation(change.event, change.model, change.progress, change.message)

    def _activation(
        self, event: ActivationEventKind, model: str | None, progress: float | None, message: str
    ) -> None:
        activation = Activation(
            node=self.settings.name, event=event, model=model, at=time.time(),
            progress=progress, message=message[:4000],  # gateways refuse longer messages
        )
        if self._on_activation is not None:
            self._on_activation(activation)
        log.log(logging.DEBUG if event == "progress" else logging.INFO,
                "activation %s%s %s", event, f" model={model}" if model else "", message)
        if self._nc is not None and not self._nc.is_closed:
            self._spawn(
                self._nc.publish(
                    activation_subject(self.settings.name, root=self.settings.root),
                    codec.encode(activation),
                )
            )

    # ------------------------------------------------------------------ what the control plane uses

    def engine_for(self, harness: str) -> Engine | str:
        """The engine for ``harness``, or why a load for it is refused (REFERENCE §6.1)."""
        if harness not in self.settings.harnesses:
            return f"unknown harness: {harness}"
        engine = self._engines.get(harness)
        if engine is None:
            return f"expected harness={'|'.join(sorted(self._engines))}, got harness={harness}"
        return engine

    async def _reply(self, subject: str, payload: bytes) -> None:
        await self.nc.publish(subject, payload)

    def cancel_job(self, job_id: str) -> bool:
        return self._runner.cancel(job_id)

    async def drain(self) -> None:
        self._activation("draining", None, None, "")
        await self._stop_taking_jobs()

    async def state_changed(self) -> None:
        """Tell the gateways at once (a heartbeat out of turn)."""
        await self._publish_heartbeat()

    # ------------------------------------------------------------------ connection events

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._draining:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")
        await self._publish_heartbeat()

    async def _on_closed(self) -> None:
        if self._stopping:
            log.info("NATS connection closed")
            return
        log.error("the NATS connection closed for good; this neuron cannot serve without it")
        self.lost.set()
