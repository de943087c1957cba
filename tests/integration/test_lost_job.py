"""A job whose last events never reach the gateway (published while it was reconnecting to NATS)
ends its client's stream with one clean error within seconds, not at the 600 s idle timeout: the
node's heartbeats stop listing the job (`cortex.fleet.FleetView.lost_job`). A job still listed,
or a node that does not list its jobs, is never given up for its silence alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from bus_schema.messages import JobAccepted, JobRequest
from cortex.bus import GatewayBus
from cortex.errors import Reason
from cortex.fleet import LOST_AFTER_S
from cortex.relay import Batch, Failed, Finished, TextDelta, relay
from tests.support.fake_neuron import FakeNeuron

pytestmark = pytest.mark.integration
MODEL = "fake/lost"
NODE = "lost-node"
"""(``MODEL`` and ``NODE``: the fake neuron of `tests/integration/conftest.py`.)"""


async def _all(outcomes: AsyncIterator[Batch], timeout_s: float) -> Batch:
    got: Batch = []
    async with asyncio.timeout(timeout_s):
        async for batch in outcomes:
            got.extend(batch)
    return got


def _text(batch: Batch) -> str:
    return "".join(o.text for o in batch if isinstance(o, TextDelta))


async def test_a_job_whose_end_was_lost_ends_with_one_clean_error_within_seconds(
    bus: GatewayBus, neuron: FakeNeuron
) -> None:
    listed = ["job-lost"]
    async with neuron.heartbeating(listed, bus.fleet):
        stream = await bus.submit(JobRequest(job_id="job-lost", model=MODEL, prompt="go"))
        accepted = await stream.first(5)
        assert isinstance(accepted, JobAccepted)
        job, reply = neuron.replies.get_nowait()
        await neuron.stream(reply, job, ["a", "b"], finish=False)
        silent = time.monotonic()
        listed.clear()  # the job ended on the node; its finish never arrives
        got = await _all(relay(stream, accepted), timeout_s=LOST_AFTER_S + 10)
        took = time.monotonic() - silent
    failures = [o for o in got if isinstance(o, Failed)]
    assert len(failures) == 1 and got[-1] is failures[0]
    assert not [o for o in got if isinstance(o, Finished)]
    error = failures[0].error
    assert error.reason is Reason.STREAM_BROKEN
    assert f"neuron '{NODE}' ended the job, but its last events were lost" in error.message
    assert _text(got) == "ab"
    assert LOST_AFTER_S <= took < LOST_AFTER_S + 3, took
    assert bus.running_on(NODE) == 0


@pytest.mark.parametrize("listing", ["the job listed", "jobs not listed"])
async def test_a_silent_job_its_node_still_holds_is_waited_for(
    bus: GatewayBus, neuron: FakeNeuron, listing: str
) -> None:
    async with neuron.heartbeating(["job-slow"] if listing == "the job listed" else None,
                                   bus.fleet):
        stream = await bus.submit(JobRequest(job_id="job-slow", model=MODEL, prompt="go"))
        accepted = await stream.first(5)
        assert isinstance(accepted, JobAccepted)
        job, reply = neuron.replies.get_nowait()
        outcomes = relay(stream, accepted)
        await neuron.stream(reply, job, ["a"], finish=False)

        async def finish_later() -> None:  # a long silence (a slow prefill), then the rest
            await asyncio.sleep(LOST_AFTER_S + 1.5)
            await neuron.stream(reply, job, ["b"], first_seq=2)

        later = asyncio.create_task(finish_later())
        got = await _all(outcomes, timeout_s=LOST_AFTER_S + 10)
        await later
    assert not [o for o in got if isinstance(o, Failed)], got
    assert isinstance(got[-1], Finished)
    assert _text(got) == "ab"
