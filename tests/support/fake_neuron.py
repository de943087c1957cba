"""A fake neuron on a real nats-server for gateway bus tests: it accepts every job of its model,
records cancels, streams what a test tells it to, and heartbeats when asked to (the ``neuron``
fixture of `tests/integration/conftest.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_schema import codec
from bus_schema.messages import (
    CancelJob,
    Heartbeat,
    JobAccepted,
    JobFinished,
    JobRequest,
    TokenChunk,
    Usage,
)
from bus_schema.subjects import control_subject, heartbeat_subject, job_subject
from cortex.fleet import FleetView
from tests.support.nats_sync import confirm_subscriptions


@dataclass
class FakeNeuron:
    """Accepts every job and records cancels; the test makes it stream."""

    nc: Client
    root: str
    model: str
    node: str
    replies: asyncio.Queue[tuple[JobRequest, str]] = field(default_factory=asyncio.Queue)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    cancels: list[CancelJob] = field(default_factory=list)

    async def start(self) -> None:
        await self.nc.subscribe(job_subject(self.model, root=self.root), cb=self._on_job)
        await self.nc.subscribe(control_subject(self.node, "cancel", root=self.root),
                                cb=self._on_cancel)
        await confirm_subscriptions(self.nc)

    async def _on_job(self, msg: Msg) -> None:
        assert msg.reply
        job = codec.decode_job_request(msg.data)
        await self.nc.publish(msg.reply, codec.encode(JobAccepted(
            job_id=job.job_id, node=self.node, model=self.model, prompt_tokens=3,
            max_tokens=10**6)))
        self.replies.put_nowait((job, msg.reply))

    async def _on_cancel(self, msg: Msg) -> None:
        request = codec.decode_control_request(msg.data)
        assert isinstance(request, CancelJob)
        self.cancels.append(request)
        self.cancelled.set()

    async def stream(self, reply: str, job: JobRequest, texts: list[str], *,
                     finish: bool = True, first_seq: int = 1) -> None:
        """Publish a chunk per text (seq ``first_seq``…), then the finish; yields to the loop
        now and then as a neuron does."""
        for seq, text in enumerate(texts, start=first_seq):
            await self.nc.publish(reply, codec.encode(
                TokenChunk(job_id=job.job_id, seq=seq, text=text, token_ids=(seq,))))
            if seq % 64 == 0:
                await asyncio.sleep(0)
        if finish:
            last = first_seq + len(texts)
            await self.nc.publish(reply, codec.encode(JobFinished(
                job_id=job.job_id, seq=last, finish_reason="length",
                usage=Usage(prompt_tokens=3, completion_tokens=last - 1))))
        await self.nc.flush()

    @contextlib.asynccontextmanager
    async def heartbeating(self, jobs: list[str] | None, fleet: FleetView,
                           interval_s: float = 0.2) -> AsyncIterator[None]:
        """Heartbeat every ``interval_s`` while in the block, listing ``jobs`` (the caller may
        change the list; None: the jobs are not listed, as an older neuron); the block starts
        once ``fleet`` (the gateway's) knows the node."""
        started = time.time()

        async def beat() -> None:
            seq = 0
            while True:
                seq += 1
                await self.nc.publish(heartbeat_subject(self.node, root=self.root), codec.encode(
                    Heartbeat(node=self.node, seq=seq, sent_at=time.time(),
                              interval_s=interval_s, started_at=started,
                              jobs=None if jobs is None else tuple(jobs))))
                await asyncio.sleep(interval_s)

        task = asyncio.create_task(beat())
        try:
            async with asyncio.timeout(10):
                while fleet.node(self.node) is None:  # noqa: ASYNC110 - the first heartbeat
                    await asyncio.sleep(0.02)
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
