"""The neuron against a real nats-server: heartbeats, discovery, the job stream protocol,
cancellation and failures. The model is scripted so output and timing are exact."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from bus_schema import codec, messages, subjects
from bus_schema.errors import ErrorCode
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker
from tests.support.scripted_engine import Script, ScriptedEngine

pytestmark = pytest.mark.integration
MODEL = "test-org/scripted-1.0"


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "scripted.gguf"
    path.write_bytes(b"")
    return path


async def start_worker(
    nats_url: str, root: str, model_file: Path, script: Script, **overrides: object
) -> Worker:
    settings = NeuronSettings(
        name="n1", nats_url=nats_url, root=root, heartbeat_interval_s=0.2,
        models=(ModelSpec(source=str(model_file), served_name=MODEL),),
        **overrides,  # type: ignore[arg-type]
    )
    worker = Worker(settings, ScriptedEngine(script))
    await worker.start()
    async with asyncio.timeout(10):
        await worker.ready.wait()
    return worker


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


async def run_job(
    nc: Client, root: str, job: messages.JobRequest, *, subject: str | None = None
) -> list[messages.JobEvent]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject or subjects.job_subject(job.model, root=root), codec.encode(job),
                     reply=inbox)
    events: list[messages.JobEvent] = []
    async with asyncio.timeout(10):
        while not events or not isinstance(events[-1], messages.JobFinished | messages.JobFailed):
            msg = await sub.next_msg(timeout=5)
            events.append(codec.decode_job_event(msg.data))
    await sub.unsubscribe()
    return events


def chat_job(**params: object) -> messages.JobRequest:
    return messages.JobRequest(
        job_id=uuid.uuid4().hex, model=MODEL,
        messages=(messages.ChatMessage(role="user", content="say hello"),),
        params=messages.SamplingParams(**params),  # type: ignore[arg-type]
    )


async def test_heartbeats_are_readable_json_with_the_resident_model(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    sub = await client.subscribe(f"{subject_root}.>")
    worker = await start_worker(nats_url, subject_root, model_file, Script())
    try:
        async with asyncio.timeout(5):
            while True:
                msg = await sub.next_msg(timeout=3)
                if msg.subject == subjects.heartbeat_subject("n1", root=subject_root):
                    payload = json.loads(msg.data)  # what `nats sub` prints
                    if payload["models"]:
                        break
        assert payload["kind"] == "heartbeat"
        assert payload["node"] == "n1"
        assert payload["models"][0]["id"] == MODEL
        assert payload["models"][0]["status"] == "loaded"
        assert payload["devices"][-1]["kind"] == "cpu"
    finally:
        await worker.shutdown()


async def test_load_publishes_activation_events_in_order(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    sub = await client.subscribe(subjects.activation_wildcard(root=subject_root))
    worker = await start_worker(nats_url, subject_root, model_file, Script(load_delay_s=0.6))
    try:
        kinds: list[str] = []
        async with asyncio.timeout(5):
            while "ready" not in kinds:
                event = codec.decode_fleet_event((await sub.next_msg(timeout=3)).data)
                assert isinstance(event, messages.Activation)
                kinds.append(event.event)
        assert kinds[0] == "queued" and kinds[1] == "started"
        assert "progress" in kinds
        assert kinds[-1] == "ready"
    finally:
        await worker.shutdown()


async def test_discover_is_answered_with_a_heartbeat(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    worker = await start_worker(nats_url, subject_root, model_file, Script())
    try:
        reply = await client.request(
            subjects.discover_subject(root=subject_root),
            codec.encode(messages.DiscoverRequest(gateway="t")), timeout=2,
        )
        beat = codec.decode_fleet_event(reply.data)
        assert isinstance(beat, messages.Heartbeat)
        assert [m.id for m in beat.models] == [MODEL]
    finally:
        await worker.shutdown()


async def test_job_stream_is_accepted_chunks_with_contiguous_seq_then_finished(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    worker = await start_worker(nats_url, subject_root, model_file, Script())
    try:
        events = await run_job(client, subject_root, chat_job(max_tokens=100))
    finally:
        await worker.shutdown()
    accepted, *chunks, finished = events
    assert isinstance(accepted, messages.JobAccepted)
    assert accepted.node == "n1" and accepted.prompt_tokens == 4  # "<user> say hello <assistant>"
    assert all(isinstance(c, messages.TokenChunk) for c in chunks)
    assert [e.seq for e in events] == list(range(len(events)))
    text = "".join(c.text for c in chunks if isinstance(c, messages.TokenChunk))
    assert text == "Hello from the scripted model."
    assert isinstance(finished, messages.JobFinished)
    assert finished.finish_reason == "stop"
    assert finished.usage == messages.Usage(prompt_tokens=4, completion_tokens=6)


async def test_directed_job_reaches_the_named_node(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    worker = await start_worker(nats_url, subject_root, model_file, Script())
    try:
        events = await run_job(client, subject_root, chat_job(max_tokens=2),
                               subject=subjects.node_job_subject("n1", MODEL, root=subject_root))
    finally:
        await worker.shutdown()
    assert isinstance(events[-1], messages.JobFinished)
    assert events[-1].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 2


async def test_job_for_a_model_nobody_holds_gets_no_responders(
    nats_url: str, subject_root: str, client: Client
) -> None:
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    job = messages.JobRequest(job_id="j", model="nobody/has-this")
    await client.publish(subjects.job_subject(job.model, root=subject_root), codec.encode(job),
                         reply=inbox)
    msg = await sub.next_msg(timeout=2)
    assert msg.headers is not None and msg.headers.get("Status") == "503"


async def test_prompt_too_long_fails_before_acceptance(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    worker = await start_worker(nats_url, subject_root, model_file, Script(), max_prompt_tokens=3)
    try:
        events = await run_job(client, subject_root, chat_job())
    finally:
        await worker.shutdown()
    assert len(events) == 1
    failed = events[0]
    assert isinstance(failed, messages.JobFailed)
    assert (failed.seq, failed.code) == (0, ErrorCode.PROMPT_TOO_LONG)
    assert (failed.prompt_tokens, failed.max_prompt_tokens) == (4, 3)


async def test_template_error_fails_before_acceptance(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    worker = await start_worker(nats_url, subject_root, model_file, Script())
    job = messages.JobRequest(job_id="j", model=MODEL,
                              messages=(messages.ChatMessage(role="assistant", content="x"),))
    try:
        events = await run_job(client, subject_root, job)
    finally:
        await worker.shutdown()
    assert isinstance(events[0], messages.JobFailed)
    assert events[0].code == ErrorCode.TEMPLATE_ERROR


async def test_cancel_stops_a_running_job(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    script = Script(words=tuple(f" w{i}" for i in range(60)), token_delay_s=0.05)
    worker = await start_worker(nats_url, subject_root, model_file, script)
    try:
        job = chat_job()
        inbox = client.new_inbox()
        sub = await client.subscribe(inbox)
        await client.publish(subjects.job_subject(MODEL, root=subject_root), codec.encode(job),
                             reply=inbox)
        accepted = codec.decode_job_event((await sub.next_msg(timeout=3)).data)
        assert isinstance(accepted, messages.JobAccepted)
        await sub.next_msg(timeout=3)  # a first token chunk
        reply = await client.request(
            subjects.control_subject(accepted.node, "cancel", root=subject_root),
            codec.encode(messages.CancelJob(job_id=job.job_id)), timeout=2,
        )
        assert codec.decode_control_reply(reply.data).status == 200
        events: list[messages.JobEvent] = []
        async with asyncio.timeout(5):
            while not events or not isinstance(events[-1], messages.JobFinished):
                events.append(codec.decode_job_event((await sub.next_msg(timeout=3)).data))
    finally:
        await worker.shutdown()
    finished = events[-1]
    assert isinstance(finished, messages.JobFinished)
    assert finished.finish_reason == "cancelled"
    assert finished.usage.completion_tokens < 60


async def test_engine_failure_mid_stream_ends_with_job_failed(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    worker = await start_worker(nats_url, subject_root, model_file, Script(fail_after=2))
    try:
        events = await run_job(client, subject_root, chat_job())
        # the neuron survives and serves the next job
        again = await run_job(client, subject_root, chat_job())
    finally:
        await worker.shutdown()
    assert [e.seq for e in events] == list(range(len(events)))
    failed = events[-1]
    assert isinstance(failed, messages.JobFailed)
    assert failed.code == ErrorCode.ENGINE_ERROR
    assert failed.message == "the model failed while generating; see the neuron's log"
    assert "scripted device failure" not in failed.message  # library text stays in the log
    assert isinstance(again[-1], messages.JobFailed)


async def test_admission_limit_refuses_with_overloaded(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    script = Script(words=(" a",) * 20, token_delay_s=0.05)
    worker = await start_worker(nats_url, subject_root, model_file, script, max_jobs=1)
    try:
        first = asyncio.ensure_future(run_job(client, subject_root, chat_job()))
        async with asyncio.timeout(5):
            while worker.jobs_running == 0:  # noqa: ASYNC110 - wait for the first admission
                await asyncio.sleep(0.01)
        second = await run_job(client, subject_root, chat_job())
        assert isinstance(second[0], messages.JobFailed)
        assert second[0].code == ErrorCode.OVERLOADED and second[0].retryable
        assert isinstance((await first)[-1], messages.JobFinished)
    finally:
        await worker.shutdown()


async def test_unload_control_stops_serving_the_model(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    worker = await start_worker(nats_url, subject_root, model_file, Script())
    try:
        reply = await client.request(
            subjects.control_subject("n1", "unload", root=subject_root),
            codec.encode(messages.UnloadRequest(model_id=MODEL)), timeout=2,
        )
        assert codec.decode_control_reply(reply.data).status == 200
        missing = await client.request(
            subjects.control_subject("n1", "unload", root=subject_root),
            codec.encode(messages.UnloadRequest(model_id=MODEL)), timeout=2,
        )
        decoded = codec.decode_control_reply(missing.data)
        assert decoded.status == 404
        assert decoded.message == f"model '{MODEL}' not found on any harness"
        assert worker.heartbeat().models == ()
    finally:
        await worker.shutdown()


async def test_drain_stops_new_jobs_but_keeps_the_node_visible(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    worker = await start_worker(nats_url, subject_root, model_file, Script())
    try:
        reply = await client.request(
            subjects.control_subject("n1", "drain", root=subject_root),
            codec.encode(messages.DrainRequest()), timeout=2,
        )
        assert codec.decode_control_reply(reply.data).status == 200
        inbox = client.new_inbox()
        sub = await client.subscribe(inbox)
        job = chat_job()
        await client.publish(subjects.job_subject(MODEL, root=subject_root), codec.encode(job),
                             reply=inbox)
        msg = await sub.next_msg(timeout=2)
        assert msg.headers is not None and msg.headers.get("Status") == "503"
        beat = worker.heartbeat()
        assert beat.draining and [m.id for m in beat.models] == [MODEL]
    finally:
        await worker.shutdown()


async def test_heartbeats_list_the_jobs_held_until_their_end_was_published(
    nats_url: str, subject_root: str, model_file: Path, client: Client
) -> None:
    """The list a gateway reads to tell a lost job's end from a slow job (`Heartbeat.jobs`)."""
    script = Script(words=(" a",) * 20, token_delay_s=0.05)
    worker = await start_worker(nats_url, subject_root, model_file, script)
    try:
        assert worker.heartbeat().jobs == ()
        job = chat_job()
        running = asyncio.ensure_future(run_job(client, subject_root, job))
        async with asyncio.timeout(5):
            while worker.jobs_running == 0:  # noqa: ASYNC110 - wait for the admission
                await asyncio.sleep(0.01)
        assert worker.heartbeat().jobs == (job.job_id,)
        events = await running
        assert isinstance(events[-1], messages.JobFinished)
        async with asyncio.timeout(2):  # gone once its end was published
            while worker.heartbeat().jobs:  # noqa: ASYNC110 - the runner lets go of it next
                await asyncio.sleep(0.01)
    finally:
        await worker.shutdown()
