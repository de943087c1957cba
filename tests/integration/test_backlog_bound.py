"""The bound on a job's undelivered backlog (`cortex.bus.JobStream`), on a real nats-server with a
fake neuron: a reader that stops reading gets its job cancelled once `MAX_BACKLOG_EVENTS` events
or `MAX_BACKLOG_BYTES` bytes wait, the stream ends with one clean error, logged once; a reader
that keeps up is never cut off however long the stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from bus_schema.messages import JobAccepted, JobRequest
from cortex.bus import MAX_BACKLOG_BYTES, MAX_BACKLOG_EVENTS, GatewayBus
from cortex.errors import Reason
from cortex.relay import Batch, Failed, Finished, TextDelta, relay
from tests.support.fake_neuron import FakeNeuron

pytestmark = pytest.mark.integration
MODEL = "fake/backlog"
NODE = "backlog-node"
"""(``MODEL`` and ``NODE``: the fake neuron of `tests/integration/conftest.py`.)"""


async def _next(outcomes: AsyncIterator[Batch]) -> Batch:
    async with asyncio.timeout(10):
        return await anext(outcomes)


async def _rest(outcomes: AsyncIterator[Batch]) -> Batch:
    rest: Batch = []
    async with asyncio.timeout(10):
        async for batch in outcomes:
            rest.extend(batch)
    return rest


def _text(batch: Batch) -> str:
    return "".join(o.text for o in batch if isinstance(o, TextDelta))


@pytest.mark.parametrize(("chunks", "size", "bound"), [
    (MAX_BACKLOG_EVENTS + 500, 1, "events"),
    (12, MAX_BACKLOG_BYTES // 8, "bytes"),
])
async def test_a_reader_that_stops_reading_gets_its_job_cancelled_and_one_clean_error(
    bus: GatewayBus, neuron: FakeNeuron, caplog: pytest.LogCaptureFixture,
    chunks: int, size: int, bound: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="cortex")
    stream = await bus.submit(JobRequest(job_id="job-slow", model=MODEL, prompt="go"))
    accepted = await stream.first(5)
    assert isinstance(accepted, JobAccepted)
    assert bus.running_on(NODE) == 1
    job, reply = neuron.replies.get_nowait()
    outcomes = relay(stream, accepted)
    texts = [f"{i % 10}" * size for i in range(chunks)]
    await neuron.stream(reply, job, texts[:1], finish=False)
    first = await _next(outcomes)  # the reader got one batch, then stops reading
    await neuron.stream(reply, job, texts[1:], first_seq=2)  # chunk 1 was sent above
    async with asyncio.timeout(10):
        await neuron.cancelled.wait()

    assert [c.job_id for c in neuron.cancels] == ["job-slow"]
    behind = stream.fell_behind
    assert behind is not None
    if bound == "events":
        assert behind.events == MAX_BACKLOG_EVENTS + 1 and behind.size < MAX_BACKLOG_BYTES
    else:
        assert behind.size > MAX_BACKLOG_BYTES and behind.events < MAX_BACKLOG_EVENTS
    assert bus.running_on(NODE) == 0, "the gateway still counts the job as running"
    rest = await _rest(outcomes)  # the reader comes back
    failures = [o for o in rest if isinstance(o, Failed)]
    assert len(failures) == 1 and rest[-1] is failures[0]
    assert not [o for o in rest if isinstance(o, Finished)]
    error = failures[0].error
    assert error.reason is Reason.STREAM_BROKEN
    assert error.message.startswith("the client fell too far behind")
    delivered = _text(first) + _text(rest)
    assert delivered == "".join(texts[:len(delivered) // size])  # a prefix, in order
    assert len(delivered) // size < chunks
    logged = [r for r in caplog.records if "fell too far behind" in r.getMessage()]
    assert len(logged) == 1 and logged[0].getMessage().startswith("job=job-slow ")
    await asyncio.sleep(0.1)
    assert [c.job_id for c in neuron.cancels] == ["job-slow"], "cancelled again on release"


async def test_a_reader_that_keeps_up_is_never_cut_off(
    bus: GatewayBus, neuron: FakeNeuron
) -> None:
    # the node heartbeats (once a second, as by default): a pause in the stream while the
    # machine is busy is a slow node, never a dead one (a CI run failed this test over it)
    async with neuron.heartbeating(["job-fast"], bus.fleet, interval_s=1.0):
        await _keep_up(bus, neuron)


async def _keep_up(bus: GatewayBus, neuron: FakeNeuron) -> None:
    stream = await bus.submit(JobRequest(job_id="job-fast", model=MODEL, prompt="go"))
    accepted = await stream.first(5)
    assert isinstance(accepted, JobAccepted)
    job, reply = neuron.replies.get_nowait()
    texts = [f" {i}" for i in range(3 * MAX_BACKLOG_EVENTS)]
    got: Batch = []
    read_texts = 0
    progress = asyncio.Event()

    async def read() -> None:
        nonlocal read_texts
        async with asyncio.timeout(30):
            async for batch in relay(stream, accepted):
                got.extend(batch)
                read_texts += sum(isinstance(o, TextDelta) for o in batch)
                progress.set()

    async def write() -> None:
        """Bursts of a quarter of the bound, each once the reader has taken the one before:
        the reader keeps up, however the loop schedules the two (the backlog stays under half
        the bound)."""
        burst = MAX_BACKLOG_EVENTS // 4
        for start in range(0, len(texts), burst):
            async with asyncio.timeout(10):
                while read_texts < start - burst:
                    progress.clear()
                    await progress.wait()
            await neuron.stream(reply, job, texts[start:start + burst], first_seq=start + 1,
                                finish=start + burst >= len(texts))

    async with asyncio.TaskGroup() as group:
        group.create_task(read())
        group.create_task(write())
    assert _text(got) == "".join(texts)
    assert isinstance(got[-1], Finished)
    assert not neuron.cancels
    assert stream.fell_behind is None
