"""The ctransformers harness through a real neuron on the bus: a SentencePiece GGUF loads and
streams, a BPE GGUF is refused with 422 ``unsupported_architecture`` naming the torch engine, and
a crash of the library's process fails the running job cleanly while the neuron goes on serving."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from bus_schema import codec, messages, subjects
from bus_schema.errors import ErrorCode
from neuron.engines.ctransformers_engine import CTransformersEngine, CTransformersModel
from neuron.settings import NeuronSettings
from neuron.worker import Worker
from tests.support.tiny_models import TinyModel
from tests.support.tiny_sentencepiece import build_tiny_sentencepiece

NODE = "ct-node"


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


@pytest.fixture
async def worker(nats_url: str, subject_root: str, client: Client) -> AsyncIterator[Worker]:
    settings = NeuronSettings(name=NODE, nats_url=nats_url, root=subject_root, device="cpu",
                              heartbeat_interval_s=0.2)
    neuron = Worker(settings, {"ctransformers": CTransformersEngine(threads=1)})
    beats = await client.subscribe(subjects.heartbeat_subject(NODE, root=subject_root))
    await neuron.start()
    await beats.next_msg(timeout=5)
    await beats.unsubscribe()
    yield neuron
    await neuron.shutdown()


async def _load(nc: Client, root: str, path: Path) -> messages.ControlReply:
    request = messages.LoadRequest(model_id=str(path), harness="ctransformers")
    reply = await nc.request(subjects.control_subject(NODE, "load", root=root),
                             codec.encode(request), timeout=30)
    return codec.decode_control_reply(reply.data)


async def _job(nc: Client, root: str, model: str, max_tokens: int,
               on_event: object = None) -> list[messages.JobEvent]:
    job = messages.JobRequest(
        job_id=uuid.uuid4().hex, model=model,
        messages=(messages.ChatMessage(role="user", content="tell me about cats"),),
        params=messages.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.job_subject(model, root=root), codec.encode(job), reply=inbox)
    events: list[messages.JobEvent] = []
    async with asyncio.timeout(30):
        while not events or not isinstance(events[-1], messages.JobFinished | messages.JobFailed):
            events.append(codec.decode_job_event((await sub.next_msg(timeout=20)).data))
            if callable(on_event):
                on_event(events[-1])
    await sub.unsubscribe()
    return events


async def test_a_sentencepiece_gguf_loads_and_streams(
    worker: Worker, client: Client, subject_root: str, tmp_path: Path,
) -> None:
    tiny = build_tiny_sentencepiece(tmp_path)
    reply = await _load(client, subject_root, tiny.gguf_path)
    assert reply.status == 200, reply.message
    events = await _job(client, subject_root, "local/tiny-spm", 12)
    assert isinstance(events[0], messages.JobAccepted)
    assert [e.seq for e in events] == list(range(len(events)))
    finished = events[-1]
    assert isinstance(finished, messages.JobFinished)
    assert finished.usage.completion_tokens >= 1
    assert any(isinstance(e, messages.TokenChunk) and e.token_ids for e in events)


async def test_a_bpe_gguf_is_refused_with_unsupported_architecture(
    worker: Worker, client: Client, subject_root: str, tiny_model: TinyModel,
) -> None:
    reply = await _load(client, subject_root, tiny_model.gguf_path)
    assert (reply.status, reply.code) == (422, ErrorCode.UNSUPPORTED_ARCHITECTURE)
    assert "torch" in reply.message
    assert worker.residency.loaded() == []


async def test_a_crash_in_the_library_fails_the_job_and_the_neuron_goes_on(
    worker: Worker, client: Client, subject_root: str, tmp_path: Path,
) -> None:
    tiny = build_tiny_sentencepiece(tmp_path)
    assert (await _load(client, subject_root, tiny.gguf_path)).status == 200
    slot = worker.residency.get("local/tiny-spm")
    assert slot is not None and isinstance(slot.model, CTransformersModel)
    model = slot.model

    killed: list[int] = []

    def crash_on_first_token(event: messages.JobEvent) -> None:
        if isinstance(event, messages.TokenChunk) and not killed:
            killed.append(model.worker_pid)
            os.kill(killed[0], signal.SIGSEGV)

    events = await _job(client, subject_root, "local/tiny-spm", 2000, crash_on_first_token)
    failed = events[-1]
    assert isinstance(failed, messages.JobFailed)
    assert failed.code == ErrorCode.ENGINE_ERROR
    assert "died" in failed.message and "SIGSEGV" in failed.message
    again = await _job(client, subject_root, "local/tiny-spm", 8)
    assert isinstance(again[-1], messages.JobFinished)  # the neuron and the model carry on
