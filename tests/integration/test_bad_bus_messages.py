"""Bad bus messages are dropped, counted and logged without flooding: undecodable or forged jobs
never reach a neuron's runner, heartbeats that name another node than their subject never reach
the gateway's fleet view, and both keep serving."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import msgspec
import nats
import pytest

from bus_schema import codec, messages, subjects
from bus_schema.drops import Drops
from cortex.bus import GatewayBus
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker
from tests.support.scripted_engine import Script, ScriptedEngine

pytestmark = pytest.mark.integration
MODEL = "test-org/drops"


def test_drops_are_counted_by_kind_and_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    drops = Drops(logging.getLogger("drops-test"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="drops-test"):
        for _ in range(50):
            drops.drop("job", "cortex.job.x", "bad")
        drops.drop("fleet", "cortex.fleet.heartbeat." + "y" * 1000, "forged")
        now[0] += 11
        drops.drop("job", "cortex.job.x", "bad again")
    assert drops.total == 52
    assert drops.by_kind == {"job": 51, "fleet": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # the first job drop, the fleet drop, one job line after 10 s
    assert "50 job messages dropped since the last report" in lines[2]
    assert all(len(line) < 500 for line in lines)  # untrusted subjects are shortened


async def test_a_neuron_drops_undecodable_forged_and_replyless_jobs_and_keeps_serving(
    nats_url: str, subject_root: str, tmp_path: Path,
) -> None:
    weights = tmp_path / "drops.gguf"
    weights.write_bytes(b"")
    worker = Worker(NeuronSettings(name="dropper", nats_url=nats_url, root=subject_root,
                                   heartbeat_interval_s=0.2,
                                   models=(ModelSpec(source=str(weights), served_name=MODEL),)),
                    ScriptedEngine(Script(words=(" fine",))))
    await worker.start()
    nc = await nats.connect(nats_url)
    try:
        async with asyncio.timeout(10):
            await worker.ready.wait()
        subject = subjects.job_subject(MODEL, root=subject_root)
        inbox = nc.new_inbox()
        replies = await nc.subscribe(inbox)
        job = messages.JobRequest(job_id=uuid.uuid4().hex, model=MODEL,
                                  messages=(messages.ChatMessage(role="user", content="hi"),))
        other = msgspec.structs.replace(job, model="test-org/not-served-here")
        await nc.publish(subject, b"\xff not json", reply=inbox)
        await nc.publish(subject, codec.encode(other), reply=inbox)  # forged: another model
        await nc.publish(subject, codec.encode(job))  # no reply subject
        await nc.flush()
        heartbeats = await nc.subscribe(subjects.heartbeat_subject("dropper", root=subject_root))
        async with asyncio.timeout(10):
            while True:
                beat = codec.decode_fleet_event((await heartbeats.next_msg(timeout=5)).data)
                assert isinstance(beat, messages.Heartbeat)
                if beat.dropped_messages == 3:
                    break
        assert worker.drops.by_kind == {"job": 3}
        # none of them was answered, and a good job still runs
        with pytest.raises(nats.errors.TimeoutError):
            await replies.next_msg(timeout=0.3)
        await nc.publish(subject, codec.encode(job), reply=inbox)
        events: list[messages.JobEvent] = []
        async with asyncio.timeout(10):
            while not events or not isinstance(events[-1], messages.JobFinished):
                events.append(codec.decode_job_event((await replies.next_msg(timeout=5)).data))
        assert isinstance(events[0], messages.JobAccepted)

        # an unreadable job that says which it is and where to answer gets a JobFailed at once
        await nc.publish(subject, b'{"kind": "job", "job_id": 7}', reply=inbox,
                         headers={subjects.Headers.JOB_ID: "unreadable-1"})
        failed = codec.decode_job_event((await replies.next_msg(timeout=5)).data)
        assert isinstance(failed, messages.JobFailed)
        assert (failed.job_id, failed.seq, failed.code) == ("unreadable-1", 0, "invalid_request")
        assert "cannot read this job" in failed.message
    finally:
        await nc.close()
        await worker.shutdown()


async def test_a_second_job_with_a_running_job_id_is_refused(
    nats_url: str, subject_root: str, tmp_path: Path,
) -> None:
    weights = tmp_path / "twice.gguf"
    weights.write_bytes(b"")
    worker = Worker(NeuronSettings(name="twice", nats_url=nats_url, root=subject_root,
                                   models=(ModelSpec(source=str(weights), served_name=MODEL),)),
                    ScriptedEngine(Script(words=(" slow",) * 200, token_delay_s=0.02)))
    await worker.start()
    nc = await nats.connect(nats_url)
    try:
        async with asyncio.timeout(10):
            await worker.ready.wait()
        subject = subjects.job_subject(MODEL, root=subject_root)
        job = messages.JobRequest(job_id="same-id", model=MODEL,
                                  messages=(messages.ChatMessage(role="user", content="hi"),))
        first, second = nc.new_inbox(), nc.new_inbox()
        first_sub, second_sub = await nc.subscribe(first), await nc.subscribe(second)
        await nc.publish(subject, codec.encode(job), reply=first)
        accepted = codec.decode_job_event((await first_sub.next_msg(timeout=5)).data)
        assert isinstance(accepted, messages.JobAccepted)
        await nc.publish(subject, codec.encode(job), reply=second)
        refused = codec.decode_job_event((await second_sub.next_msg(timeout=5)).data)
        assert isinstance(refused, messages.JobFailed)
        assert refused.code == "invalid_request" and "already running" in refused.message
    finally:
        await nc.close()
        await worker.shutdown()


async def test_the_gateway_drops_heartbeats_that_name_another_node_than_their_subject(
    nats_url: str, subject_root: str,
) -> None:
    bus = GatewayBus(GatewaySettings(nats_url=nats_url, root=subject_root), FleetView())
    await bus.start()
    nc = await nats.connect(nats_url)
    try:
        def beat(node: str) -> bytes:
            now = time.time()
            return codec.encode(messages.Heartbeat(node=node, seq=1, sent_at=now, interval_s=1.0,
                                                   started_at=now))

        await nc.publish(subjects.heartbeat_subject("mallory", root=subject_root), beat("alice"))
        await nc.publish(subjects.activation_subject("alice", root=subject_root), beat("alice"))
        await nc.publish(subjects.heartbeat_subject("bob", root=subject_root), b"{\"kind\": 1}")
        await nc.publish(subjects.heartbeat_subject("carol", root=subject_root), beat("carol"))
        await nc.flush()
        async with asyncio.timeout(5):
            while "carol" not in [n.name for n in bus.fleet.nodes()]:  # noqa: ASYNC110 - heartbeat arrives
                await asyncio.sleep(0.02)
        assert [n.name for n in bus.fleet.nodes()] == ["carol"]
        assert bus.drops.by_kind == {"fleet": 3}
        assert bus.connected
    finally:
        await nc.close()
        await bus.close()
