"""The gateway's failover on the real bus, against fake neurons whose every message the test
chooses (fast heartbeats, so a silent node is gone in a fraction of a second): the continuation
carries exactly the delivered ids, late events of the abandoned attempt never reach the client,
a neuron that does not know resuming is never let answer, and resuming stops after
`MAX_RESUMES`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_schema import codec
from bus_schema.messages import (
    CancelJob,
    Heartbeat,
    JobAccepted,
    JobEvent,
    JobFinished,
    JobRequest,
    ResidentModel,
    TokenChunk,
    Usage,
)
from bus_schema.subjects import control_subject, heartbeat_subject, node_job_subject
from cortex.bus import GatewayBus, JobStream
from cortex.errors import Reason
from cortex.failover import MAX_RESUMES
from cortex.fleet import FleetView
from cortex.relay import Failed, Finished, Outcome, TextDelta, relay
from cortex.routing import start_job
from cortex.settings import GatewaySettings
from tests.support.nats_sync import confirm_subscriptions

pytestmark = pytest.mark.integration
MODEL = "fake/model"
BEAT_S = 0.1
PROMPT_TOKENS = 7


@dataclass
class Attempt:
    """A job as one fake neuron received it, and the way to answer it."""

    job: JobRequest
    reply: str
    neuron: FakeNeuron
    seq: int = 0

    async def send(self, event: Callable[[int], JobEvent]) -> None:
        await self.neuron.nc.publish(self.reply, codec.encode(event(self.seq)))
        self.seq += 1

    async def accept(self, resumed: int | None = None) -> None:
        count = len(self.job.resume.token_ids) if self.job.resume is not None else 0
        await self.send(lambda seq: JobAccepted(
            job_id=self.job.job_id, seq=seq, node=self.neuron.name, model=MODEL,
            prompt_tokens=PROMPT_TOKENS, max_tokens=100,
            resumed_tokens=count if resumed is None else resumed))

    async def chunk(self, text: str, ids: tuple[int, ...]) -> None:
        await self.send(lambda seq: TokenChunk(job_id=self.job.job_id, seq=seq, text=text,
                                               token_ids=ids))

    async def finish(self, completion_tokens: int) -> None:
        await self.send(lambda seq: JobFinished(
            job_id=self.job.job_id, seq=seq, finish_reason="length",
            usage=Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=completion_tokens)))
        await self.neuron.nc.flush()


@dataclass
class FakeNeuron:
    """Heartbeats (until it `die`s) and hands each job it receives to the test."""

    name: str
    nc: Client
    root: str
    jobs: asyncio.Queue[Attempt] = field(default_factory=asyncio.Queue)
    cancels: list[str] = field(default_factory=list)
    alive: bool = True

    async def start(self) -> None:
        await self.nc.subscribe(node_job_subject(self.name, MODEL, root=self.root),
                                cb=self._on_job)
        await self.nc.subscribe(control_subject(self.name, "cancel", root=self.root),
                                cb=self._on_cancel)
        await confirm_subscriptions(self.nc)
        await self.beat()

    async def beat(self, seq: int = 0) -> None:
        await self.nc.publish(heartbeat_subject(self.name, root=self.root), codec.encode(
            Heartbeat(node=self.name, seq=seq, sent_at=time.time(), interval_s=BEAT_S,
                      started_at=0.0, models=(ResidentModel(id=MODEL, status="loaded"),))))

    def die(self) -> None:
        """Stop heartbeating and answering (the process was killed or frozen)."""
        self.alive = False

    async def next_job(self) -> Attempt:
        async with asyncio.timeout(10):
            return await self.jobs.get()

    async def _on_job(self, msg: Msg) -> None:
        assert msg.reply
        self.jobs.put_nowait(Attempt(codec.decode_job_request(msg.data), msg.reply, self))

    async def _on_cancel(self, msg: Msg) -> None:
        request = codec.decode_control_request(msg.data)
        assert isinstance(request, CancelJob)
        self.cancels.append(request.job_id)


@pytest.fixture
async def gateway(nats_url: str, subject_root: str) -> AsyncIterator[GatewayBus]:
    bus = GatewayBus(GatewaySettings(nats_url=nats_url, root=subject_root, discover_wait_s=0.01,
                                     replica_accept_timeout_s=2.0, accept_timeout_s=2.0),
                     FleetView())
    await bus.start()
    yield bus
    await bus.close()


Neurons = Callable[..., Awaitable[list[FakeNeuron]]]


@pytest.fixture
async def neurons(nats_url: str, subject_root: str, gateway: GatewayBus
                  ) -> AsyncIterator[Neurons]:
    """``await neurons("a", "b")``: fake neurons the gateway already routes to."""
    started: list[FakeNeuron] = []

    async def beating() -> None:
        seq = 1
        while True:
            await asyncio.sleep(BEAT_S)
            for neuron in started:
                if neuron.alive:
                    await neuron.beat(seq)
            seq += 1

    async def make(*names: str) -> list[FakeNeuron]:
        made = [FakeNeuron(name, await nats.connect(nats_url), subject_root) for name in names]
        for neuron in made:
            await neuron.start()
        started.extend(made)
        changed = asyncio.Event()
        gateway.fleet.listen(changed.set)
        async with asyncio.timeout(5):
            while {loc.node for loc in gateway.fleet.routable(MODEL)} != {n.name for n in started}:
                await changed.wait()
                changed.clear()
        return made

    task = asyncio.ensure_future(beating())
    yield make
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for neuron in started:
        await neuron.nc.close()


def _job() -> JobRequest:
    return JobRequest(job_id="job-1", model=MODEL, prompt="go")


async def _start(gateway: GatewayBus, neuron: FakeNeuron) -> tuple[JobStream, JobAccepted,
                                                                   Attempt]:
    """Start the job (it goes to ``neuron``, the least loaded) and accept it there."""
    starting = asyncio.ensure_future(start_job(gateway, _job()))
    attempt = await neuron.next_job()
    await attempt.accept()
    stream, accepted = await starting
    return stream, accepted, attempt


async def _drain(outcomes: AsyncIterator[list[Outcome]], into: list[Outcome]) -> None:
    async for batch in outcomes:
        into.extend(batch)


def _text(outcomes: list[Outcome]) -> str:
    return "".join(o.text for o in outcomes if isinstance(o, TextDelta))


async def test_the_continuation_carries_the_delivered_ids_and_late_events_are_dropped(
    gateway: GatewayBus, neurons: Neurons
) -> None:
    a, b = await neurons("a", "b")
    stream, accepted, first = await _start(gateway, a)
    await first.chunk("Hel", (1, 2))
    await first.chunk("lo", (3,))
    a.die()
    outcomes: list[Outcome] = []
    relaying = asyncio.ensure_future(_drain(relay(stream, accepted), outcomes))

    second = await b.next_job()
    assert second.job.job_id == "job-1-r1"
    assert second.job.resume is not None
    assert second.job.resume.token_ids == (1, 2, 3)
    assert second.job.resume.resumed_from == "job-1"
    assert (second.job.prompt, second.job.params) == (first.job.prompt, first.job.params)
    await second.accept()
    # The abandoned attempt wakes up and goes on: the gateway has stopped listening to it.
    await first.chunk(" from a", (4,))
    await first.finish(4)
    await a.nc.flush()
    await asyncio.sleep(0.1)
    await second.chunk(" world", (4, 5))
    await second.finish(5)
    async with asyncio.timeout(5):
        await relaying
    assert _text(outcomes) == "Hello world"
    terminal = [o for o in outcomes if isinstance(o, Finished | Failed)]
    assert terminal == [Finished("length", PROMPT_TOKENS, 5)]
    assert a.cancels == ["job-1"]  # told to stop, for when it wakes up
    assert b.cancels == []


async def test_a_neuron_that_does_not_know_resuming_is_not_let_answer(
    gateway: GatewayBus, neurons: Neurons
) -> None:
    a, old, new = await neurons("a", "b-old", "c-new")
    stream, accepted, first = await _start(gateway, a)
    await first.chunk("Hel", (1,))
    a.die()
    outcomes: list[Outcome] = []
    relaying = asyncio.ensure_future(_drain(relay(stream, accepted), outcomes))
    # The least loaded replica first (both idle: by name), then the next.
    starting_over = await old.next_job()
    await starting_over.accept(resumed=0)  # an old neuron ignores `resume`
    second = await new.next_job()
    assert second.job.job_id == "job-1-r2"
    assert second.job.resume is not None and second.job.resume.token_ids == (1,)
    await second.accept()
    await second.chunk("lo", (2,))
    await second.finish(2)
    async with asyncio.timeout(5):
        await relaying
    assert _text(outcomes) == "Hello"
    assert old.cancels == ["job-1-r1"]


async def test_resuming_gives_up_after_the_bound_with_a_stream_error(
    gateway: GatewayBus, neurons: Neurons
) -> None:
    fleet = await neurons(*(f"n{i}" for i in range(MAX_RESUMES + 2)))
    stream, accepted, attempt = await _start(gateway, fleet[0])
    outcomes: list[Outcome] = []
    relaying = asyncio.ensure_future(_drain(relay(stream, accepted), outcomes))
    for i in range(MAX_RESUMES + 1):  # every attempt dies after one token
        if i:
            attempt = await fleet[i].next_job()
            await attempt.accept()
        await attempt.chunk(str(i), (i,))
        fleet[i].die()
    async with asyncio.timeout(10):
        await relaying
    assert fleet[-1].jobs.empty()  # a healthy replica was left, but the bound was reached
    assert _text(outcomes) == "".join(str(i) for i in range(MAX_RESUMES + 1))
    [failed] = [o for o in outcomes if isinstance(o, Failed | Finished)]
    assert isinstance(failed, Failed)
    assert failed.error.reason is Reason.STREAM_BROKEN
    assert "stopped heartbeating" in failed.error.message
    assert f"gave up after {MAX_RESUMES} resumes" in failed.error.message


async def test_without_another_replica_the_stream_fails_soon_after_its_node_went_silent(
    gateway: GatewayBus, neurons: Neurons
) -> None:
    [a] = await neurons("a")
    stream, accepted, first = await _start(gateway, a)
    await first.chunk("Hel", (1,))
    silent_from = time.monotonic()
    a.die()
    outcomes: list[Outcome] = []
    async with asyncio.timeout(10):
        await _drain(relay(stream, accepted), outcomes)
    waited = time.monotonic() - silent_from
    [failed] = [o for o in outcomes if isinstance(o, Failed | Finished)]
    assert isinstance(failed, Failed)
    assert "stopped heartbeating" in failed.error.message
    assert "could not be resumed" in failed.error.message
    # Gone after 2.5 missed beats of 0.1 s, noticed on a 0.25 s check: far below the keep-alive
    # interval (10 s) that used to be the only moment the node was looked at.
    assert waited < 2.0, f"took {waited:.2f}s"
