"""The gateway's side of the bus: one NATS connection, the fleet subscriptions, and job streams.

All jobs share one wildcard inbox subscription (``_INBOX.<root>.<gateway>.*``, see
`bus_schema.subjects.gateway_inbox`); each job's events are routed by the last subject token into
its `JobStream`. The job is published on the same connection
as that subscription, so a job for a model nobody serves comes back at once as a no-responders
status (`NoRespondersError`). nats-py errors are translated here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Final, assert_never

import nats
import nats.errors
import nats.micro
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.micro.service import Service

from bus_schema import codec
from bus_schema.connection import parse_nats_urls
from bus_schema.drops import Drops
from bus_schema.messages import (
    PROTOCOL_VERSION,
    Activation,
    CancelJob,
    ControlReply,
    ControlRequest,
    DiscoverRequest,
    Heartbeat,
    JobAccepted,
    JobEvent,
    JobFailed,
    JobFinished,
    JobRequest,
)
from bus_schema.service import GATEWAY_SERVICE, package_version, service_version
from bus_schema.subjects import (
    ControlVerb,
    Headers,
    activation_subject,
    activation_wildcard,
    control_subject,
    discover_subject,
    gateway_inbox,
    heartbeat_subject,
    heartbeat_wildcard,
    job_subject,
)
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings

log = logging.getLogger(__name__)

#: Room left for headers and protocol framing when checking a job against ``max_payload``.
_HEADER_ROOM: Final = 4096
#: How often a silent job stream checks that its node still heartbeats (`FleetView.is_gone`).
LIVENESS_CHECK_S: Final = 0.25
#: Most events one job may have waiting for its client (`JobStream`); past this, or past
#: `MAX_BACKLOG_BYTES`, the client fell too far behind and the job is cancelled.
MAX_BACKLOG_EVENTS: Final = 4096
#: Most payload bytes one job may have waiting for its client.
MAX_BACKLOG_BYTES: Final = 4 * 1024 * 1024


class BusError(Exception):
    """Root of the gateway's bus errors."""


class NoRespondersError(BusError):
    """Nobody subscribes the job's subject (the model is not resident anywhere right now)."""


class PayloadTooLargeError(BusError):
    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"request is {size} bytes encoded; the bus accepts at most {limit}")


class StreamTimeoutError(BusError):
    """The stream went silent for too long (or its node stopped heartbeating)."""


class JobLostError(BusError):
    """The stream is silent and its node no longer holds the job: the job ended there, but its
    last events never arrived (`cortex.fleet.FleetView.lost_job`). Not resumed: the job may have
    finished, and a continuation would add to a complete answer."""

    def __init__(self, node: str) -> None:
        self.node = node
        super().__init__(f"neuron '{node}' ended the job, but its last events were lost on the "
                         "way (a NATS reconnect?)")


class NodeGoneError(StreamTimeoutError):
    """The stream is silent and its node stopped heartbeating (killed, frozen or cut off)."""

    def __init__(self, node: str) -> None:
        self.node = node
        super().__init__(f"neuron '{node}' stopped heartbeating mid-stream")


class StreamProtocolError(BusError):
    """Events out of order, missing or undecodable: something was lost."""


class BusUnavailableError(BusError):
    """Not connected to NATS."""


class ClientTooSlowError(BusError):
    """The job's client stopped reading: its undelivered backlog passed the bound, so the job was
    cancelled on its neuron and its later events dropped."""

    def __init__(self, events: int, size: int) -> None:
        self.events = events
        self.size = size
        super().__init__(f"the client fell too far behind ({events} events, {size} bytes "
                         "undelivered); the job was cancelled")


class Keepalive:
    """Yielded by `JobStream.events` when the stream was silent for a keep-alive interval."""


KEEPALIVE: Final = Keepalive()


class JobStream:
    """The events of one job, checked for order, with timeouts.

    The events wait here until the relay takes them, which it does only as fast as its HTTP
    client reads. The backlog is bounded: past `MAX_BACKLOG_EVENTS` events or `MAX_BACKLOG_BYTES`
    payload bytes the stream stops queuing, drops what waits, cancels the job on its neuron, and
    its reader gets `ClientTooSlowError` once it reads again.
    """

    def __init__(self, bus: GatewayBus, job: JobRequest, inbox_token: str) -> None:
        self._bus = bus
        self.job = job
        self._token = inbox_token
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._backlog_bytes = 0
        self.fell_behind: ClientTooSlowError | None = None
        """Set once the backlog passed its bound (the job was cancelled then)."""
        self._next_seq = 0
        self.node: str | None = None
        self._counted = False
        self.finished = False
        """True once a terminal event was received (no cancel needed)."""

    @property
    def bus(self) -> GatewayBus:
        """The bus this stream's job runs on (a failover starts its continuation there)."""
        return self._bus

    def _deliver(self, msg: Msg) -> bool:
        """Queue ``msg`` for the reader; False if that passed the backlog bound (then the caller
        awaits `_give_up`)."""
        if self.fell_behind is not None:
            return True  # already given up: late events are dropped
        size = len(msg.data)
        if (self._queue.qsize() >= MAX_BACKLOG_EVENTS
                or self._backlog_bytes + size > MAX_BACKLOG_BYTES):
            self.fell_behind = ClientTooSlowError(self._queue.qsize() + 1,
                                                  self._backlog_bytes + size)
            return False
        self._backlog_bytes += size
        self._queue.put_nowait(msg)
        return True

    async def _give_up(self) -> None:
        """The client fell too far behind: free the backlog, stop routing the inbox here,
        cancel the job on its neuron. The reader raises `fell_behind` when it next reads."""
        error = self.fell_behind
        assert error is not None
        while not self._queue.empty():
            self._queue.get_nowait()
        self._backlog_bytes = 0
        node = self.node
        self.close()
        # logged once the job's place on its node is given back, so whoever reads the log (a
        # test, an operator) sees the gateway's accounting already settled
        log.warning("job=%s %s on %s", self.job.job_id, error, node or "(not accepted)")
        if not self.finished and node is not None:
            await self._bus.cancel(node, self.job.job_id, "the client fell too far behind")

    def _take(self, msg: Msg) -> Msg:
        self._backlog_bytes -= len(msg.data)
        return msg

    def _check_behind(self) -> None:
        if self.fell_behind is not None:
            raise self.fell_behind

    def _decode(self, msg: Msg) -> JobEvent | None:
        """The next event of this job; None for an event of another job on its inbox (dropped:
        only this job's events reach its client)."""
        if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
            raise NoRespondersError(f"no neuron serves model '{self.job.model}'")
        try:
            event = codec.decode_job_event(msg.data)
        except codec.BusDecodeError as exc:
            raise StreamProtocolError(f"undecodable event: {exc}") from exc
        if event.job_id != self.job.job_id:
            self._bus.drops.drop("job event", msg.subject,
                                 f"an event of job {event.job_id!r} on this job's inbox")
            return None
        if event.seq != self._next_seq:
            raise StreamProtocolError(
                f"expected event seq {self._next_seq}, got {event.seq} ({type(event).__name__})"
            )
        self._next_seq += 1
        if isinstance(event, JobFinished | JobFailed):
            self.finished = True
        return event

    async def first(self, timeout_s: float | None = None) -> JobEvent:
        """The first event: `JobAccepted` or an admission `JobFailed`.

        Raises:
            NoRespondersError: nobody serves the model.
            StreamTimeoutError: nothing within ``timeout_s`` (default ``accept_timeout_s``).
        """
        limit = timeout_s if timeout_s is not None else self._bus.settings.accept_timeout_s
        self._check_behind()
        try:
            async with asyncio.timeout(limit):
                event = None
                while event is None:
                    event = self._decode(self._take(await self._queue.get()))
        except TimeoutError:
            raise StreamTimeoutError(f"no neuron accepted the job within {limit:g}s") from None
        if isinstance(event, JobAccepted):
            self.node = event.node
            self._bus.started(event.node)
            self._counted = True
        return event

    async def events(self) -> AsyncIterator[list[JobEvent] | Keepalive]:
        """Events after the first, in batches of whatever had arrived together (so a relay can
        write them to its client at once), ending with the terminal one; `KEEPALIVE` on silence.

        While silent, the stream checks its node's heartbeats every `LIVENESS_CHECK_S`
        (independently of the keep-alive period), so a dead or frozen node is given up within
        `cortex.fleet.GONE_AFTER_BEATS` heartbeat intervals.

        Raises:
            NodeGoneError: silent, and the node stopped heartbeating.
            JobLostError: silent, and the node's heartbeats say the job ended there.
            StreamTimeoutError: silent longer than ``stream_idle_timeout_s``.
            StreamProtocolError: a gap or an undecodable event (after the good events before it).
            ClientTooSlowError: the backlog passed its bound while the reader was away.
        """
        settings = self._bus.settings
        fleet = self._bus.fleet
        last = quiet = time.monotonic()  # the last event; the last event or keep-alive
        queue = self._queue
        while not self.finished:
            self._check_behind()
            if queue.empty():
                wait = min(LIVENESS_CHECK_S,
                           quiet + settings.keepalive_interval_s - time.monotonic())
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        msg = self._take(await queue.get())
                except TimeoutError:
                    now = time.monotonic()
                    if self.node is not None and fleet.is_gone(self.node):
                        raise NodeGoneError(self.node) from None
                    if self.node is not None and fleet.lost_job(self.node, self.job.job_id,
                                                                silent_since=last):
                        raise JobLostError(self.node) from None
                    if now - last > settings.stream_idle_timeout_s:
                        raise StreamTimeoutError(
                            f"stream silent for {now - last:.0f}s") from None
                    if now - quiet >= settings.keepalive_interval_s:
                        quiet = now
                        yield KEEPALIVE
                    continue
            else:
                msg = self._take(queue.get_nowait())
            last = quiet = time.monotonic()
            batch: list[JobEvent] = []
            try:
                event = self._decode(msg)
                while True:
                    if event is not None:
                        batch.append(event)
                    if self.finished or queue.empty():
                        break
                    event = self._decode(self._take(queue.get_nowait()))
            except BusError:
                if batch:
                    yield batch
                raise
            if batch:
                yield batch

    async def cancel(self, reason: str = "client disconnected") -> None:
        """Tell the running node to stop (no-op once finished, cancelled for falling behind, or
        before acceptance)."""
        if self.finished or self.fell_behind is not None or self.node is None:
            return
        await self._bus.cancel(self.node, self.job.job_id, reason)

    async def release(self) -> None:
        """Done with this stream, however it ended: cancel the job if it still runs, stop
        routing its inbox (idempotent). Responses also run it after they are sent, so a client
        that leaves before the body's first byte still frees the neuron's slot."""
        if not self.finished:
            await self.cancel()
        self.close()

    def close(self) -> None:
        """Stop routing this job's inbox messages here (idempotent)."""
        self._bus.forget(self._token)
        if self._counted and self.node is not None:
            self._counted = False
            self._bus.ended(self.node)


class GatewayBus:
    """One NATS connection for a gateway: fleet view upkeep and job submission."""

    def __init__(
        self, settings: GatewaySettings, fleet: FleetView, *,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """``on_lost`` is called if the NATS connection closes for good while the gateway is not
        shutting down (nats-py gives up only on fatal errors): a gateway cut off from its bus
        must exit so its supervisor restarts it, not answer every request with an error."""
        self.settings = settings
        self.fleet = fleet
        self.drops = Drops(log)
        """Bad bus messages this gateway dropped."""
        self._on_lost = on_lost
        self.lost = False
        self._nc: NatsClient | None = None
        self._inbox = gateway_inbox(settings.gateway_id, root=settings.root)
        self._discover_inbox = f"{self._inbox}.discover"
        self._streams: dict[str, JobStream] = {}
        self._closing = False
        self._service: Service | None = None
        self._discovered = asyncio.Event()
        self._running: dict[str, int] = {}
        """Jobs this gateway has running per node (heartbeats only tell every second)."""

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def max_payload(self) -> int:
        return self._nc.max_payload if self._nc is not None else 0

    async def start(self) -> None:
        """Connect to ``settings.nats_url``, follow the fleet, and ask it to report in."""
        if self.settings.nats_url is None:
            raise BusUnavailableError("no NATS URL configured")
        await self.connect(self.settings.nats_url)

    async def discovered(self) -> None:
        """Return once the start-up discovery window has passed (at once, after that)."""
        await self._discovered.wait()

    async def connect(self, url: str) -> None:
        """Connect, follow heartbeats and activations, and ask the fleet to report in.

        ``url`` may list several servers (comma-separated); credentials in it apply to all.
        """
        endpoint = parse_nats_urls(url)
        self._nc = await nats.connect(
            **endpoint.connect_options(ca_file=self.settings.nats_ca),
            inbox_prefix=self._inbox,  # control replies too: every inbox under our one prefix
            name=f"cortex:{self.settings.gateway_id}",
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
        )
        root = self.settings.root
        await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_inbox)
        await self._nc.subscribe(heartbeat_wildcard(root=root), cb=self._on_fleet)
        await self._nc.subscribe(activation_wildcard(root=root), cb=self._on_fleet)
        await self._nc.subscribe(self._discover_inbox, cb=self._on_fleet)
        self._service = await nats.micro.add_service(
            self._nc,
            name=GATEWAY_SERVICE,
            version=service_version(package_version()),
            description=f"Cortex gateway '{self.settings.gateway_id}': OpenAI API over the bus",
            metadata={"gateway": self.settings.gateway_id, "root": root},
        )
        await self.discover()
        asyncio.get_running_loop().call_later(self.settings.discover_wait_s, self._discovered.set)
        log.info("gateway %s connected to %s (max payload %d bytes)",
                 self.settings.gateway_id, endpoint.redacted(), self._nc.max_payload)

    async def discover(self) -> None:
        """Ask every neuron for its heartbeat now; answers arrive on our discover inbox."""
        nc = self._require()
        await nc.publish(
            discover_subject(root=self.settings.root),
            codec.encode(DiscoverRequest(gateway=self.settings.gateway_id)),
            reply=self._discover_inbox,
        )
        await nc.flush()

    async def close(self) -> None:
        self._closing = True
        if self._service is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._service.stop()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await nc.drain()

    def _require(self) -> NatsClient:
        if self._nc is None or self._nc.is_closed:
            raise BusUnavailableError("not connected to NATS")
        return self._nc

    async def submit(self, job: JobRequest, *, subject: str | None = None) -> JobStream:
        """Publish ``job`` and return its stream (call `JobStream.first` next).

        Raises:
            PayloadTooLargeError: the encoded job exceeds the server's limit.
            BusUnavailableError: not connected.
        """
        nc = self._require()
        payload = codec.encode(job)
        limit = nc.max_payload - _HEADER_ROOM
        if len(payload) > limit:
            raise PayloadTooLargeError(len(payload), limit)
        token = uuid.uuid4().hex
        stream = JobStream(self, job, token)
        self._streams[token] = stream
        try:
            await nc.publish(
                subject or job_subject(job.model, root=self.settings.root),
                payload,
                reply=f"{self._inbox}.{token}",
                headers={
                    Headers.JOB_ID: job.job_id,
                    Headers.MODEL: job.model,
                    Headers.PROTOCOL: str(PROTOCOL_VERSION),
                },
            )
        except nats.errors.Error as exc:
            stream.close()
            raise BusUnavailableError(f"publishing the job failed: {exc}") from exc
        return stream

    def running_on(self, node: str) -> int:
        """Jobs this gateway has running on ``node`` now, or offered to it and not yet answered
        (`cortex.routing`)."""
        return self._running.get(node, 0)

    def started(self, node: str) -> None:
        self._running[node] = self._running.get(node, 0) + 1

    def ended(self, node: str) -> None:
        left = self._running.get(node, 0) - 1
        if left > 0:
            self._running[node] = left
        else:
            self._running.pop(node, None)

    def forget(self, token: str) -> None:
        """Drop a finished or abandoned stream from the inbox routing table."""
        self._streams.pop(token, None)

    async def cancel(self, node: str, job_id: str, reason: str) -> None:
        """Fire-and-forget ``ctl.cancel`` to ``node`` (the job's deadline covers a lost cancel)."""
        if self._nc is None or self._nc.is_closed:
            return
        with contextlib.suppress(nats.errors.Error):
            await self._nc.publish(
                control_subject(node, "cancel", root=self.settings.root),
                codec.encode(CancelJob(job_id=job_id, reason=reason)),
                headers={Headers.JOB_ID: job_id},
            )

    async def control(
        self, node: str, verb: ControlVerb, request: ControlRequest, *, timeout_s: float
    ) -> ControlReply:
        """Send a ``ctl.<verb>`` request to ``node`` and return its reply.

        Raises:
            BusUnavailableError: not connected, nobody answers, or no answer in ``timeout_s``.
            StreamProtocolError: the reply is not a `ControlReply`.
        """
        nc = self._require()
        try:
            msg = await nc.request(control_subject(node, verb, root=self.settings.root),
                                   codec.encode(request), timeout=timeout_s)
        except nats.errors.NoRespondersError:
            raise BusUnavailableError(f"neuron '{node}' does not answer ctl.{verb}") from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise BusUnavailableError(
                f"neuron '{node}' did not answer ctl.{verb} within {timeout_s:g}s"
            ) from None
        except nats.errors.Error as exc:
            raise BusUnavailableError(f"ctl.{verb} to '{node}' failed: {exc}") from exc
        try:
            return codec.decode_control_reply(msg.data)
        except codec.BusDecodeError as exc:
            raise StreamProtocolError(f"bad ctl.{verb} reply from '{node}': {exc}") from exc

    async def _on_inbox(self, msg: Msg) -> None:
        stream = self._streams.get(msg.subject.rpartition(".")[2])
        if stream is not None and not stream._deliver(msg):
            await stream._give_up()

    async def _on_fleet(self, msg: Msg) -> None:
        if not msg.data and msg.headers and msg.headers.get("Status"):
            return  # e.g. no-responders to a discovery nobody answered: no neurons yet
        try:
            event = codec.decode_fleet_event(msg.data)
        except codec.BusDecodeError as exc:
            self.drops.drop("fleet", msg.subject, str(exc))
            return
        root = self.settings.root
        match event:
            case Heartbeat():
                expected = heartbeat_subject(event.node, root=root)
            case Activation():
                expected = activation_subject(event.node, root=root)
            case _:
                assert_never(event)
        if msg.subject != expected and not (msg.subject == self._discover_inbox
                                            and isinstance(event, Heartbeat)):
            # the subject is what the bus's permissions pin to a node: a body naming another
            # node (or a heartbeat on an activation subject) is forged. Discovery answers come
            # on this gateway's inbox, where any neuron may answer.
            self.drops.drop("fleet", msg.subject, f"names node {event.node!r}, not its subject's")
            return
        self.fleet.apply(event)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS; rediscovering the fleet")
        await self.discover()

    async def _on_closed(self) -> None:
        if self._closing:
            log.info("NATS connection closed")
            return
        self.lost = True
        log.error("the NATS connection closed for good; this gateway cannot serve without it")
        if self._on_lost is not None:
            self._on_lost()
