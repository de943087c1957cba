"""Continuous batching through a real neuron on the bus, with a tiny torch model: eight jobs sent
at once run in shared forward passes (the step count proves it), each streams exactly what it
streams alone, a cancel stops its job while the others go on, and the neuron keeps heartbeating
on time while its model is busy."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from bus_schema import codec, messages, subjects
from neuron.engines.torch_engine import TorchEngine, TorchModel
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker
from tests.support.tiny_models import TinyModel

NODE = "batcher"
MODEL = "test-org/tiny-batched"


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


@pytest.fixture
async def worker(nats_url: str, subject_root: str, tiny_model: TinyModel) -> AsyncIterator[Worker]:
    settings = NeuronSettings(
        name=NODE, nats_url=nats_url, root=subject_root, device="cpu", heartbeat_interval_s=0.25,
        models=(ModelSpec(source=str(tiny_model.folder), served_name=MODEL),),
    )
    neuron = Worker(settings, TorchEngine(dtype="float32", prefill_chunk_tokens=32))
    await neuron.start()
    async with asyncio.timeout(30):
        await neuron.ready.wait()
    yield neuron
    await neuron.shutdown()


def _model(worker: Worker) -> TorchModel:
    slot = worker.residency.get(MODEL)
    assert slot is not None and isinstance(slot.model, TorchModel)
    return slot.model


async def _run(nc: Client, root: str, text: str, max_tokens: int,
               job_id: str | None = None,
               first_chunk: asyncio.Event | None = None) -> list[messages.JobEvent]:
    job = messages.JobRequest(
        job_id=job_id or uuid.uuid4().hex, model=MODEL,
        messages=(messages.ChatMessage(role="user", content=text),),
        params=messages.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                       repetition_penalty=1.0),
    )
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.job_subject(MODEL, root=root), codec.encode(job), reply=inbox)
    events: list[messages.JobEvent] = []
    async with asyncio.timeout(60):
        while not events or not isinstance(events[-1], messages.JobFinished | messages.JobFailed):
            events.append(codec.decode_job_event((await sub.next_msg(timeout=30)).data))
            if first_chunk is not None and isinstance(events[-1], messages.TokenChunk):
                first_chunk.set()
    await sub.unsubscribe()
    return events


def _tokens(events: list[messages.JobEvent]) -> list[int]:
    assert isinstance(events[-1], messages.JobFinished), events[-1]
    return [t for e in events if isinstance(e, messages.TokenChunk) for t in e.token_ids]


PROMPTS = [f"{word} and the cat sat on the mat number {i}" for i, word in
           enumerate(["Paris", "France", "capital", "river", "bread", "music", "snow", "tea"])]


async def test_eight_jobs_run_batched_and_each_streams_what_it_streams_alone(
    worker: Worker, client: Client, subject_root: str,
) -> None:
    alone = [_tokens(await _run(client, subject_root, p, 24)) for p in PROMPTS]
    model = _model(worker)
    steps_before = model.batching.steps
    together = await asyncio.gather(*(_run(client, subject_root, p, 24) for p in PROMPTS))
    assert [_tokens(events) for events in together] == alone
    steps = model.batching.steps - steps_before
    generated = sum(len(tokens) for tokens in alone)
    assert model.batching.largest_batch >= 4
    assert steps < generated / 2, (steps, generated)  # one after another: > `generated` steps


async def test_a_cancelled_job_stops_and_the_others_finish(
    worker: Worker, client: Client, subject_root: str,
) -> None:
    quitter_id = uuid.uuid4().hex
    streaming = asyncio.Event()
    quitter = asyncio.ensure_future(_run(client, subject_root, PROMPTS[0], 200, quitter_id,
                                         streaming))
    others = [asyncio.ensure_future(_run(client, subject_root, p, 40)) for p in PROMPTS[1:4]]
    await streaming.wait()  # its first tokens are out: cancel it mid-stream
    reply = await client.request(subjects.control_subject(NODE, "cancel", root=subject_root),
                                 codec.encode(messages.CancelJob(job_id=quitter_id)), timeout=5)
    assert codec.decode_control_reply(reply.data).status == 200
    cancelled = await quitter
    finished = cancelled[-1]
    assert isinstance(finished, messages.JobFinished) and finished.finish_reason == "cancelled"
    assert finished.usage.completion_tokens < 200
    for job in others:
        assert isinstance((await job)[-1], messages.JobFinished)


async def test_heartbeats_stay_on_time_while_the_model_is_busy(
    worker: Worker, client: Client, subject_root: str,
) -> None:
    beats = await client.subscribe(subjects.heartbeat_subject(NODE, root=subject_root))
    arrivals: list[float] = []

    async def listen() -> None:
        while True:
            await beats.next_msg(timeout=10)
            arrivals.append(time.monotonic())

    listener = asyncio.ensure_future(listen())
    started = time.monotonic()
    for _ in range(50):  # keep the model busy for at least 2 s (8 intervals), however fast it is
        await asyncio.gather(*(_run(client, subject_root, p, 120) for p in PROMPTS))
        if time.monotonic() - started > 2:
            break
    listener.cancel()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) >= 2
    # a generous bound (the interval is 0.25 s): a starved event loop would miss whole seconds
    assert max(gaps) < 1.5, gaps
