"""The neuron's control verbs against a real nats-server: loads admitted against the memory
budget, single-flight loads, pin/unpin and evictions that respect pins, the LRU clock in
heartbeats, preflight refusals and harness checks. Hub ids resolve from a hand-written hub cache
(``HF_HUB_OFFLINE=1``); the engine is scripted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from bus_schema import codec, messages, subjects
from bus_schema.errors import ErrorCode
from bus_schema.subjects import ControlVerb
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker
from tests.support.hub_cache import cache_repo
from tests.support.scripted_engine import Script, ScriptedEngine

pytestmark = pytest.mark.integration
NODE = "n1"
A, B = "test-org/model-a", "test-org/model-b"
QUANTS = "test-org/quants-GGUF"


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    """A hub cache holding two one-file GGUF repos and one repo with a single q4_k_m quant."""
    cache = tmp_path / "hub"
    for repo in (A, B):
        cache_repo(cache, repo, {"model.gguf": b"GGUF"})
    cache_repo(cache, QUANTS, {"m-q4_k_m.gguf": b"GGUF"})
    return cache


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


async def start_worker(
    client: Client, nats_url: str, root: str, hub: Path, engine: ScriptedEngine, *,
    wait_ready: bool = True, **overrides: object,
) -> Worker:
    settings = NeuronSettings(
        name=NODE, nats_url=nats_url, root=root, heartbeat_interval_s=0.2, device="cpu",
        hf_cache=hub, **overrides,  # type: ignore[arg-type]
    )
    worker = Worker(settings, engine)
    beats = await client.subscribe(subjects.heartbeat_subject(NODE, root=root))
    await worker.start()
    # `start` returns (and, with no start-up models, `ready` is set) before the server has the
    # neuron's ctl subscription; any heartbeat was sent after it, so once one arrives here the
    # server routes control requests to the neuron.
    await beats.next_msg(timeout=5)
    await beats.unsubscribe()
    if wait_ready:
        async with asyncio.timeout(10):
            await worker.ready.wait()
    return worker


async def control(
    nc: Client, root: str, verb: ControlVerb, request: messages.BusMessage, *,
    wait_s: float = 10,
) -> messages.ControlReply:
    reply = await nc.request(subjects.control_subject(NODE, verb, root=root),
                             codec.encode(request), timeout=wait_s)
    return codec.decode_control_reply(reply.data)


async def load(nc: Client, root: str, model_id: str, **fields: object) -> messages.ControlReply:
    return await control(nc, root, "load",
                         messages.LoadRequest(model_id=model_id, **fields))  # type: ignore[arg-type]


async def discover(nc: Client, root: str) -> messages.Heartbeat:
    """The node's heartbeat, asked for over the bus."""
    reply = await nc.request(subjects.discover_subject(root=root),
                             codec.encode(messages.DiscoverRequest(gateway="t")), timeout=5)
    beat = codec.decode_fleet_event(reply.data)
    assert isinstance(beat, messages.Heartbeat)
    return beat


def resident(beat: messages.Heartbeat, model_id: str) -> messages.ResidentModel:
    found = [m for m in beat.models if m.id == model_id]
    assert len(found) == 1, f"{model_id} not in {[m.id for m in beat.models]}"
    return found[0]


def cpu(beat: messages.Heartbeat) -> messages.Device:
    (device,) = [d for d in beat.devices if d.kind == "cpu"]
    return device


async def next_activation(
    sub: Subscription, event: messages.ActivationEventKind, model: str
) -> list[messages.Activation]:
    """Activations heard on ``sub`` up to and including ``event`` for ``model``."""
    heard: list[messages.Activation] = []
    async with asyncio.timeout(10):
        while True:
            activation = codec.decode_fleet_event((await sub.next_msg(timeout=5)).data)
            assert isinstance(activation, messages.Activation)
            heard.append(activation)
            if activation.event == event and activation.model == model:
                return heard


async def run_job(nc: Client, root: str, model: str) -> list[messages.JobEvent]:
    job = messages.JobRequest(
        job_id=uuid.uuid4().hex, model=model,
        messages=(messages.ChatMessage(role="user", content="say hello"),),
    )
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.job_subject(model, root=root), codec.encode(job), reply=inbox)
    events: list[messages.JobEvent] = []
    async with asyncio.timeout(10):
        while not events or not isinstance(events[-1], messages.JobFinished | messages.JobFailed):
            events.append(codec.decode_job_event((await sub.next_msg(timeout=5)).data))
    await sub.unsubscribe()
    return events


# --------------------------------------------------------------------------- memory budget


async def test_a_load_over_the_budget_is_refused_with_insufficient_vram(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    engine = ScriptedEngine()
    worker = await start_worker(client, nats_url, subject_root, hub, engine, memory_budget_mb=1000)
    try:
        first = await load(client, subject_root, A, memory_mb=600)
        assert (first.status, first.model, first.message, first.memory_mb) == (
            200, A, "loaded", 600)

        refused = await load(client, subject_root, B, memory_mb=600)
        assert refused.status == 503
        assert refused.code == ErrorCode.INSUFFICIENT_MEMORY
        assert refused.memory_mb == 600
        assert "1000 MiB budget" in refused.message
        assert "400 MiB free" in refused.message and "need 600 MiB" in refused.message
        assert [m.files.model_id for m in engine.loaded] == [A]  # nothing read for B

        beat = await discover(client, subject_root)
        assert [m.id for m in beat.models] == [A]
        assert resident(beat, A).memory_mb == 600
        assert (cpu(beat).budget_mb, cpu(beat).models_mb) == (1000, 600)
        assert resident(beat, A).devices == (cpu(beat).index,)

        # the refused load left no accounting behind: once A goes, B fits
        assert (await control(client, subject_root, "unload",
                              messages.UnloadRequest(model_id=A, evict=True))).status == 200
        second = await load(client, subject_root, B, memory_mb=600)
        assert (second.status, second.memory_mb) == (200, 600)
        beat = await discover(client, subject_root)
        assert [m.id for m in beat.models] == [B]
        assert (cpu(beat).budget_mb, cpu(beat).models_mb) == (1000, 600)
    finally:
        await worker.shutdown()


async def test_the_neuron_accounts_its_own_estimate_when_the_gateway_gives_none(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    worker = await start_worker(client, nats_url, subject_root, hub, ScriptedEngine(),
                                memory_budget_mb=1000)
    try:
        reply = await load(client, subject_root, A)
        assert (reply.status, reply.memory_mb) == (200, 1)  # 4 bytes of GGUF: at least 1 MiB
        beat = await discover(client, subject_root)
        assert cpu(beat).models_mb == 1
    finally:
        await worker.shutdown()


# --------------------------------------------------------------------------- single flight


async def test_two_concurrent_loads_of_one_model_load_it_once(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    engine = ScriptedEngine(Script(load_delay_s=0.5))
    worker = await start_worker(client, nats_url, subject_root, hub, engine)
    try:
        replies = await asyncio.gather(load(client, subject_root, A, memory_mb=600),
                                       load(client, subject_root, A, memory_mb=600))
        assert len(engine.loaded) == 1
        assert [r.status for r in replies] == [200, 200]
        assert sorted(r.message for r in replies) == ["loaded", f"model '{A}' already loaded"]
        assert all(r.model == A and r.memory_mb == 600 for r in replies)
        assert [m.id for m in (await discover(client, subject_root)).models] == [A]
    finally:
        await worker.shutdown()


async def test_a_load_during_the_start_up_load_waits_for_it(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    """The worker's single flight proper: the start-up load and a ctl.load run concurrently; the
    second waits for the first and only then answers 'already loaded'."""
    engine = ScriptedEngine(Script(load_delay_s=1.0))
    sub = await client.subscribe(subjects.activation_subject(NODE, root=subject_root))
    worker = await start_worker(client, nats_url, subject_root, hub, engine, wait_ready=False,
                                models=(ModelSpec(source=A),))
    try:
        await next_activation(sub, "started", A)
        slot = worker.residency.get(A)
        assert slot is not None and slot.status == "loading"
        reply = await load(client, subject_root, A)
        assert slot.status == "loaded"  # answered only once the first load finished
        assert (reply.status, reply.message, reply.memory_mb) == (
            200, f"model '{A}' already loaded", 1)
        assert len(engine.loaded) == 1
    finally:
        await worker.shutdown()


async def test_other_control_requests_are_answered_while_a_load_runs(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    engine = ScriptedEngine(Script(load_delay_s=3.0))
    sub = await client.subscribe(subjects.activation_subject(NODE, root=subject_root))
    worker = await start_worker(client, nats_url, subject_root, hub, engine)
    try:
        loading = asyncio.ensure_future(load(client, subject_root, A))
        await next_activation(sub, "started", A)
        reply = await control(client, subject_root, "pin",
                              messages.PinRequest(model_id=B), wait_s=1.0)
        assert reply.status == 404
        assert not loading.done()
        assert (await loading).status == 200
    finally:
        await worker.shutdown()


async def test_an_unload_of_a_model_still_loading_is_409(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    engine = ScriptedEngine(Script(load_delay_s=1.0))
    sub = await client.subscribe(subjects.activation_subject(NODE, root=subject_root))
    worker = await start_worker(client, nats_url, subject_root, hub, engine, wait_ready=False,
                                models=(ModelSpec(source=A),))
    try:
        await next_activation(sub, "started", A)
        reply = await control(client, subject_root, "unload",
                              messages.UnloadRequest(model_id=A, evict=True))
        assert (reply.status, reply.code, reply.model) == (409, ErrorCode.MODEL_NOT_LOADED, A)
        assert reply.message == f"model '{A}' is still loading"
        loading = resident(await discover(client, subject_root), A)
        assert loading.status == "loading" and loading.loaded_at is None
        async with asyncio.timeout(10):
            await worker.ready.wait()
        assert resident(await discover(client, subject_root), A).status == "loaded"
    finally:
        await worker.shutdown()


# --------------------------------------------------------------------------- pin and evict


async def test_pinned_models_refuse_eviction_until_unpinned(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    engine = ScriptedEngine()
    worker = await start_worker(client, nats_url, subject_root, hub, engine)
    sub = await client.subscribe(subjects.activation_subject(NODE, root=subject_root))
    try:
        assert (await load(client, subject_root, A)).status == 200
        assert resident(await discover(client, subject_root), A).pinned is False

        pinned = await control(client, subject_root, "pin", messages.PinRequest(model_id=A))
        assert (pinned.status, pinned.model, pinned.message) == (200, A, "pinned")
        assert resident(await discover(client, subject_root), A).pinned is True

        refused = await control(client, subject_root, "unload",
                                messages.UnloadRequest(model_id=A, evict=True))
        assert (refused.status, refused.code, refused.model) == (409, ErrorCode.PINNED, A)
        assert refused.message == f"model '{A}' is pinned on this node"
        kept = resident(await discover(client, subject_root), A)
        assert (kept.status, kept.pinned) == ("loaded", True)
        assert [m.closed for m in engine.loaded] == [False]

        unpinned = await control(client, subject_root, "pin",
                                 messages.PinRequest(model_id=A, pinned=False))
        assert (unpinned.status, unpinned.message) == (200, "unpinned")
        assert resident(await discover(client, subject_root), A).pinned is False

        evicted = await control(client, subject_root, "unload",
                                messages.UnloadRequest(model_id=A, evict=True))
        assert (evicted.status, evicted.model, evicted.message) == (200, A, "evicted")
        heard = await next_activation(sub, "evicted", A)
        assert heard[-1].node == NODE
        assert not any(a.event == "unloaded" and a.model == A for a in heard)
        assert [m.closed for m in engine.loaded] == [True]
        assert (await discover(client, subject_root)).models == ()
    finally:
        await worker.shutdown()


async def test_a_plain_unload_of_a_pinned_model_is_allowed(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    worker = await start_worker(client, nats_url, subject_root, hub, ScriptedEngine())
    sub = await client.subscribe(subjects.activation_subject(NODE, root=subject_root))
    try:
        assert (await load(client, subject_root, A, pinned=True)).status == 200
        assert resident(await discover(client, subject_root), A).pinned is True  # load spec pin
        reply = await control(client, subject_root, "unload",
                              messages.UnloadRequest(model_id=A))
        assert (reply.status, reply.message) == (200, "unloaded")
        await next_activation(sub, "unloaded", A)
        assert (await discover(client, subject_root)).models == ()
    finally:
        await worker.shutdown()


async def test_pin_of_an_unknown_model_is_404(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    worker = await start_worker(client, nats_url, subject_root, hub, ScriptedEngine())
    try:
        for pinned in (True, False):
            reply = await control(client, subject_root, "pin",
                                  messages.PinRequest(model_id=B, pinned=pinned))
            assert (reply.status, reply.code, reply.model) == (404, ErrorCode.NOT_FOUND, B)
            assert reply.message == f"model '{B}' not found on any harness"
        assert (await discover(client, subject_root)).models == ()
    finally:
        await worker.shutdown()


# --------------------------------------------------------------------------- LRU clock


async def test_loaded_at_is_set_on_load_and_last_used_at_when_a_job_runs(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    worker = await start_worker(client, nats_url, subject_root, hub, ScriptedEngine())
    try:
        before_load = time.time()
        assert (await load(client, subject_root, A)).status == 200
        fresh = resident(await discover(client, subject_root), A)
        assert fresh.loaded_at is not None and before_load <= fresh.loaded_at <= time.time()
        assert fresh.last_used_at is None

        before_job = time.time()
        events = await run_job(client, subject_root, A)
        assert isinstance(events[0], messages.JobAccepted)
        assert isinstance(events[-1], messages.JobFinished)
        used = resident(await discover(client, subject_root), A)
        assert used.last_used_at is not None
        assert before_job <= used.last_used_at <= time.time()
        assert used.loaded_at == fresh.loaded_at  # a job does not move the residency floor

        await asyncio.sleep(0.01)
        await run_job(client, subject_root, A)
        again = resident(await discover(client, subject_root), A)
        assert again.last_used_at is not None and again.last_used_at > used.last_used_at
    finally:
        await worker.shutdown()


# --------------------------------------------------------------------------- refusals


async def test_a_load_refused_by_preflight_is_422_with_the_failure(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    engine = ScriptedEngine()
    worker = await start_worker(client, nats_url, subject_root, hub, engine)
    sub = await client.subscribe(subjects.activation_subject(NODE, root=subject_root))
    try:
        reply = await load(client, subject_root, QUANTS, quant="q6k")
        assert (reply.status, reply.code) == (422, ErrorCode.PREFLIGHT_FAILED)
        assert reply.preflight is not None
        assert reply.preflight.kind == "quant_not_found"
        assert reply.preflight.model_id == f"huggingface:{QUANTS}"  # the scheme made explicit
        assert reply.preflight.requested == "q6k"
        assert reply.preflight.available == ("m-q4_k_m.gguf",)
        assert reply.preflight.nearest == "q4_k_m"
        assert reply.message.startswith(f"quant 'q6k' not found in huggingface:{QUANTS}")
        await next_activation(sub, "failed", QUANTS)
        assert engine.loaded == []
        assert (await discover(client, subject_root)).models == ()
        # the same repo with a quant it has loads
        assert (await load(client, subject_root, QUANTS, quant="q4_k_m")).status == 200
    finally:
        await worker.shutdown()


async def test_a_hub_id_missing_from_the_offline_cache_is_repo_fetch_failed(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    worker = await start_worker(client, nats_url, subject_root, hub, ScriptedEngine())
    try:
        reply = await load(client, subject_root, "test-org/not-cached")
        assert (reply.status, reply.code) == (422, ErrorCode.PREFLIGHT_FAILED)
        assert reply.preflight is not None and reply.preflight.kind == "repo_fetch_failed"
        assert "HF_HUB_OFFLINE=1" in (reply.preflight.cause or "")
    finally:
        await worker.shutdown()


async def test_a_load_for_an_unknown_harness_is_400(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    engine = ScriptedEngine()
    worker = await start_worker(client, nats_url, subject_root, hub, engine,
                                harnesses=("torch", "vllm"))
    try:
        unknown = await load(client, subject_root, A, harness="X")
        assert (unknown.status, unknown.code, unknown.message) == (
            400, ErrorCode.LOAD_FAILED, "unknown harness: X")
        other = await load(client, subject_root, A, harness="vllm")
        assert (other.status, other.code, other.message) == (
            400, ErrorCode.LOAD_FAILED, "expected harness=torch, got harness=vllm")
        assert engine.loaded == []
        assert (await discover(client, subject_root)).models == ()
    finally:
        await worker.shutdown()


async def test_a_load_of_a_malformed_model_id_is_400(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    engine = ScriptedEngine()
    worker = await start_worker(client, nats_url, subject_root, hub, engine)
    try:
        reply = await load(client, subject_root, "no-slash-here")
        assert (reply.status, reply.code) == (400, ErrorCode.LOAD_FAILED)
        assert "missing the '/' between org and name" in reply.message
        assert engine.loaded == []
    finally:
        await worker.shutdown()


async def test_an_undecodable_control_request_is_400(
    nats_url: str, subject_root: str, hub: Path, client: Client
) -> None:
    worker = await start_worker(client, nats_url, subject_root, hub, ScriptedEngine())
    try:
        raw = await client.request(subjects.control_subject(NODE, "load", root=subject_root),
                                   b'{"kind": "load"}', timeout=5)
        reply = codec.decode_control_reply(raw.data)
        assert (reply.status, reply.code) == (400, ErrorCode.INVALID_REQUEST)
        assert "model_id" in reply.message
    finally:
        await worker.shutdown()
