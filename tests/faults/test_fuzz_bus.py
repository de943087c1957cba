"""Property-based fuzzing of the bus: what a gateway and a neuron hear on NATS, from a stranger.

A nats-py client of its own publishes, on every subject the gateway and the neuron listen to,
random bytes and almost-valid messages (heartbeats, activations, jobs, control requests, discovery;
valid ones changed somewhere inside, with wrong tags, oversized ids, deep nesting), and injects
events with wrong sequence numbers and job ids into a live job's inbox. Properties: neither
process loses its NATS connection or reports an error, both keep serving (a real request through
the gateway succeeds after the fuzzing), a live stream still ends in one well-formed terminal
event, no job is left running, and the gateway's fleet view stays within its bounds.

Valid ``drain`` requests and valid unloads of the served model are left out: the neuron obeys
them, as it should.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from bus_schema import codec
from bus_schema.messages import MAX_LISTED, Heartbeat
from bus_schema.subjects import (
    activation_subject,
    control_subject,
    discover_subject,
    gateway_inbox,
    heartbeat_subject,
    job_subject,
    node_job_subject,
)
from cortex.bus import GatewayBus
from cortex.embedded_nats import EmbeddedNatsServer
from cortex.fleet import MAX_NODES, FleetView
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from tests.support.json_fuzz import JsonValue, dump, mutated, text
from tests.support.scripted_engine import Script, ScriptedEngine
from tests.support.stack import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

T = TypeVar("T")
MODEL: Final = "fuzz-org/bus-1.0"
ROOT: Final = "faults-fuzz-bus"
NODE: Final = "n1"
WORDS: Final = tuple(f" w{i}" for i in range(12))
FUZZ: Final = settings(
    max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


# ------------------------------------------------------------------ the stack and the stranger


@pytest.fixture(scope="module")
def stack(
    nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    model = Path(tmp_path_factory.mktemp("bus-fuzz")) / "model.gguf"
    model.write_bytes(b"")
    script = Script(words=WORDS, token_delay_s=0.05)  # a job takes ~0.6 s: room to inject
    with LocalStack(
        nats_url=nats_server.url, root=ROOT, engine=ScriptedEngine(script),
        models=[ModelSpec(source=str(model), served_name=MODEL)],
        neuron=NeuronSettings(max_jobs=8),
        gateway=GatewaySettings(accept_timeout_s=3.0, replica_accept_timeout_s=1.0),
    ) as running:
        yield running


class Stranger:
    """A NATS client of its own, on the stack's event loop: publishes what the tests generate
    and watches the gateway's inboxes (to learn a live job's inbox)."""

    def __init__(self, stack: LocalStack, url: str) -> None:
        assert stack.loop is not None
        self._loop = stack.loop
        self._url = url
        self.nc: NatsClient | None = None
        self.inbox_events: asyncio.Queue[Msg] | None = None
        self.errors: list[BaseException] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def connect(self) -> None:
        async def on_error(exc: BaseException) -> None:
            self.errors.append(exc)

        self.nc = await nats.connect(self._url, name="fuzz-stranger", error_cb=on_error,
                                     allow_reconnect=False)
        self.inbox_events = asyncio.Queue()
        queue = self.inbox_events

        async def watch(msg: Msg) -> None:
            if msg.headers and msg.headers.get("Cortex-Node") == NODE:
                queue.put_nowait(msg)

        await self.nc.subscribe(f"_INBOX.{ROOT}.>", cb=watch)
        await self.nc.flush()

    async def publish(self, messages: list[tuple[str, bytes, str | None, dict[str, str] | None]]
                      ) -> None:
        assert self.nc is not None
        for subject, payload, reply, headers in messages:
            await self.nc.publish(subject, payload, reply=reply or "", headers=headers)
        await self.nc.flush()

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


@pytest.fixture(scope="module")
def stranger(stack: LocalStack, nats_server: EmbeddedNatsServer) -> Iterator[Stranger]:
    client = Stranger(stack, nats_server.url)
    client.call(client.connect())
    yield client
    client.call(client.close())


#: nats-py's micro services answer ``$SRV.PING/INFO/STATS`` with ``msg.respond``, which raises
#: for a request without a reply subject; nats-py reports that through the error callback. Noise
#: from the library (one warning per such message), not trouble: the connection is unaffected.
_NO_REPLY: Final = "no reply subject available"


class LogWatch:
    """Log lines that mean trouble on the bus: a NATS error or disconnection in either process
    (nats-py reports an exception escaping a subscription callback as an error), or any error
    from the gateway, the neuron or asyncio (a task that died)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog
        self._seen = 0

    def problems(self, records: list[logging.LogRecord]) -> list[str]:
        return [
            f"{r.name}: {r.getMessage()}" for r in records
            if ((r.name in ("cortex.bus", "neuron.worker")
                 and ("NATS" in r.getMessage() or "disconnected" in r.getMessage()))
                or (r.levelno >= logging.ERROR
                    and r.name.split(".")[0] in ("cortex", "neuron", "asyncio")))
            and _NO_REPLY not in r.getMessage()
        ]

    def check(self) -> None:
        """No trouble since the last check."""
        records = self._caplog.records
        new, self._seen = records[self._seen:], len(records)
        problems = self.problems(new)
        assert not problems, "\n".join(problems[:10])


@pytest.fixture
def bus_log(caplog: pytest.LogCaptureFixture) -> Iterator[LogWatch]:
    caplog.set_level(logging.WARNING)
    watch = LogWatch(caplog)
    yield watch
    late = watch.problems(caplog.get_records("call"))
    assert not late, "\n".join(late[:10])


# ------------------------------------------------------------------ properties


async def _fleet_within_bounds(bus: GatewayBus) -> tuple[int, int]:
    nodes = bus.fleet.nodes()
    return len(nodes), max((len(n.models) for n in nodes), default=0)


def assert_alive(stack: LocalStack, stranger: Stranger) -> None:
    """Both processes still on the bus (never reconnected), the gateway answering, its fleet view
    within bounds."""
    assert stack.bus is not None and stack.worker is not None
    assert stack.bus.connected and not stack.bus.lost
    assert stack.worker.nc.is_connected
    assert stack.worker.nc.stats["reconnects"] == 0
    health = httpx.get(f"{stack.base_url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["bus"] == "connected", health.text
    nodes, most_models = stranger.call(_fleet_within_bounds(stack.bus))
    assert nodes <= MAX_NODES and most_models <= MAX_LISTED


def wait_until_serving(stack: LocalStack, stranger: Stranger) -> None:
    """No job left running, and the model routable again (a forged heartbeat of the real node
    lasts until its next real one, a second later)."""
    assert stack.bus is not None and stack.worker is not None
    bus, worker = stack.bus, stack.worker

    async def state() -> tuple[int, int, bool]:
        return bus.running_on(NODE), worker.heartbeat().jobs_running, bool(
            bus.fleet.routable(MODEL))

    deadline = time.monotonic() + 8.0
    while (current := stranger.call(state())) != (0, 0, True):
        assert time.monotonic() < deadline, f"(gateway jobs, neuron jobs, routable): {current}"
        time.sleep(0.05)


def assert_a_real_request_succeeds(stack: LocalStack) -> None:
    with stack.openai_client() as client:
        reply = client.chat.completions.create(
            model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "".join(WORDS[:3])


# ------------------------------------------------------------------ strategies

ids = (st.text(st.sampled_from("abcdef0123456789-_"), min_size=1, max_size=40)
       | st.sampled_from(["", "x" * 129, "y" * 5000, "a.b", "a*", ">", "with space"]))
node_names = ids | st.sampled_from([NODE, "forged-1", "forged-2"])
model_ids = st.sampled_from([MODEL, "org/other", "", "m" * 513, "zz/" + "q" * 3000]) | text
statuses = st.sampled_from(["loaded", "loading", "unloaded", "reloading", "poisoned", "bogus"])
seqs = st.integers(0, 4) | st.sampled_from([-1, 2**63, 10**30])

resident_model = st.fixed_dictionaries(
    {"id": model_ids, "status": statuses},
    optional={"context_length": st.integers(0, 10**6), "jobs_running": st.integers(0, 9),
              "load_progress": st.floats(0, 1), "pinned": st.booleans()},
)
heartbeats = st.fixed_dictionaries({
    "kind": st.just("heartbeat"), "node": node_names, "seq": seqs,
    "sent_at": st.floats(0, 2e9), "interval_s": st.sampled_from([0.05, 1.0, 60.0]),
    "started_at": st.floats(0, 2e9),
    "models": st.lists(resident_model, max_size=3),
}, optional={
    "draining": st.booleans(), "jobs_running": st.integers(0, 9), "max_jobs": st.integers(0, 9),
    "host": st.fixed_dictionaries({"hostname": ids, "cpu_count": st.integers(0, 64),
                                   "memory_total_mb": st.integers(0, 10**6),
                                   "memory_available_mb": st.integers(0, 10**6)}),
    "devices": st.lists(st.fixed_dictionaries({
        "index": st.integers(0, 3), "kind": st.sampled_from(["cpu", "cuda", "tpu"]),
        "name": ids, "memory_total_mb": st.integers(0, 10**6),
        "memory_free_mb": st.integers(0, 10**6)}), max_size=2),
    "activation": st.fixed_dictionaries({"state": st.sampled_from(["ready", "pre_warming"]),
                                         "pending": st.lists(model_ids, max_size=2)}),
})
activations = st.fixed_dictionaries({
    "kind": st.just("activation"), "node": node_names,
    "event": st.sampled_from(["queued", "started", "progress", "ready", "failed", "unloaded",
                              "evicted", "stopping", "exploded"]),
    "at": st.floats(0, 2e9),
}, optional={"model": model_ids, "progress": st.floats(0, 1), "message": text})
job_ids = st.sampled_from(["dup-1", "dup-2"]) | st.uuids().map(str)
jobs = st.fixed_dictionaries({
    "kind": st.just("job"), "job_id": job_ids | ids,
    "model": st.sampled_from([MODEL, MODEL, MODEL, "org/other"]),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "wizard"]),
         "content": text}), max_size=3),
    "params": st.fixed_dictionaries({"max_tokens": st.integers(1, 3)}, optional={
        "temperature": st.floats(0, 2),
        "top_k": st.integers(0, 10), "stop": st.lists(text, max_size=2)}),
    "deadline": st.sampled_from([None, None, 4e9, 4e9, 0.0, -1.0]),
}, optional={
    "prompt": text,
    "tools": st.lists(st.fixed_dictionaries({"name": ids}), max_size=2),
    "chat_template_kwargs": st.dictionaries(ids, st.integers() | st.booleans(), max_size=2),
})
resumed_jobs = st.builds(
    lambda job, resume: {**job, "resume": resume}, jobs,
    st.fixed_dictionaries({"token_ids": st.lists(st.integers(0, 100), max_size=5),
                           "resumed_from": ids}))
controls = st.one_of(
    st.fixed_dictionaries({"kind": st.just("cancel"), "job_id": job_ids | ids},
                          optional={"reason": text}),
    # a harness the neuron does not have: refused before anything is resolved or downloaded
    st.fixed_dictionaries({"kind": st.just("load"), "harness": st.sampled_from(["none", ""]),
                           "model_id": st.just("/nonexistent/zz-fuzz") | ids},
                          optional={"pinned": st.booleans(), "memory_mb": st.integers(0, 99)}),
    st.fixed_dictionaries({"kind": st.just("unload"), "model_id": st.just("org/other") | ids},
                          optional={"evict": st.booleans()}),
    st.fixed_dictionaries({"kind": st.just("pin"), "model_id": st.just(MODEL) | model_ids,
                           "pinned": st.booleans()}),
    st.fixed_dictionaries({"kind": st.just("tokenize"), "model": st.just(MODEL) | model_ids},
                          optional={"prompt": text, "messages": st.lists(st.fixed_dictionaries(
                              {"role": st.just("user"), "content": text}), max_size=2)}),
)
discovers = st.fixed_dictionaries({"kind": st.just("discover"), "gateway": ids})
TAGS: Final = ["heartbeat", "activation", "job", "cancel", "load", "unload", "pin", "tokenize",
               "discover", "tok", "end", "fail", "accepted", "reply", "", "HEARTBEAT"]


def _safe(message: JsonValue) -> bool:
    """Leave out what the neuron rightly obeys: a drain, or an unload of the served model."""
    if not isinstance(message, dict):
        return True
    kind = message.get("kind")
    return kind != "drain" and not (kind == "unload" and message.get("model_id") == MODEL)


@st.composite
def almost_valid(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, JsonValue]]) -> bytes:
    """A valid message, or one changed up to three times (a wrong tag among them)."""
    message: JsonValue = draw(valid)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        message = draw(mutated(message))
    if isinstance(message, dict) and draw(st.integers(0, 9)) == 0:
        message = {**message, "kind": draw(st.sampled_from(TAGS))}
    if not _safe(message):
        message = {"kind": "cancel", "job_id": "spared"}
    return dump(message).encode("utf-8", "surrogatepass")


def _subjects(gateway_id: str) -> dict[str, list[str]]:
    """What each side listens to, by the messages meant for it."""
    inbox = gateway_inbox(gateway_id, root=ROOT)
    return {
        "fleet": [heartbeat_subject(NODE, root=ROOT), heartbeat_subject("forged-1", root=ROOT),
                  activation_subject(NODE, root=ROOT), f"{inbox}.discover"],
        "job": [job_subject(MODEL, root=ROOT), node_job_subject(NODE, MODEL, root=ROOT)],
        "control": [*(control_subject(NODE, verb, root=ROOT)
                      for verb in ("load", "unload", "pin", "cancel", "tokenize", "drain")),
                    f"{ROOT}.node.{NODE}.ctl.bogus"],
        "discover": [discover_subject(root=ROOT)],
        "any": [f"{inbox}.{uuid.uuid4().hex}", f"{inbox}.x", "$SRV.PING", "$SRV.INFO",
                "$SRV.STATS", f"{ROOT}.fleet.heartbeat.{'h' * 2000}",
                f"{ROOT}.node.{NODE}.job.{'j' * 2000}"],
    }


Publication = tuple[str, str, bytes, bool, dict[str, str] | None]
"""(kind of subject, which of them, payload, with a reply subject, headers)."""

payloads = {
    "fleet": almost_valid(heartbeats | activations),
    "job": almost_valid(jobs | jobs | jobs | resumed_jobs),
    "control": almost_valid(controls),
    "discover": almost_valid(discovers),
}
header_sets = st.none() | st.fixed_dictionaries({}, optional={
    "Status": st.sampled_from(["503", "408", "100", "x"]),
    "Job-Id": st.sampled_from(["dup-1", "z" * 300]),
    "Cortex-Protocol": st.sampled_from(["1", "999", ""]),
    "Cortex-Model": st.sampled_from([MODEL, "q" * 500]),
})


@st.composite
def publications(draw: st.DrawFn) -> Publication:
    """A message for one side (sometimes another side's message, or raw bytes) on one of its
    subjects."""
    kind = draw(st.sampled_from(["fleet", "fleet", "job", "control", "control", "discover",
                                 "any"]))
    if kind == "any" or draw(st.integers(0, 4)) == 0:  # raw bytes, or another side's message
        payload = draw(st.binary(max_size=64) | st.sampled_from([
            b"", b"{}", b"null", b"[" * 5000 + b"]" * 5000,
            b'{"kind":"heartbeat","x":' + b"[" * 3000 + b"]" * 3000 + b"}",
            b"x" * 200_000]) | payloads[draw(st.sampled_from(sorted(payloads)))])
    else:
        payload = draw(payloads[kind])
    return (kind, str(draw(st.integers(0, 99))), payload, draw(st.integers(0, 3)) > 0,
            draw(header_sets))


def _address(gateway_id: str, publication: Publication) -> tuple[str, bytes, str | None,
                                                                   dict[str, str] | None]:
    kind, which, payload, with_reply, headers = publication
    subjects = _subjects(gateway_id)[kind]
    subject = subjects[int(which) % len(subjects)]
    reply = f"_INBOX.fuzz-stranger.{uuid.uuid4().hex}" if with_reply else None
    return subject, payload, reply, headers


# ------------------------------------------------------------------ the tests


@FUZZ
@given(batch=st.lists(publications(), min_size=1, max_size=8))
def test_what_strangers_publish_breaks_neither_side(
    stack: LocalStack, stranger: Stranger, bus_log: LogWatch,
    batch: list[Publication],
) -> None:
    gateway_id = stack.gateway_settings.gateway_id
    stranger.call(stranger.publish([_address(gateway_id, p) for p in batch]))
    assert_alive(stack, stranger)
    time.sleep(0.05)  # what was published has been read by now; let its handlers finish
    bus_log.check()


async def _run_job(stranger: Stranger, payload: bytes, subject: str, *, silence_s: float
                   ) -> list[bytes]:
    """Publish a job with a reply subject of our own; every reply until a terminal event (or
    ``silence_s`` of silence)."""
    assert stranger.nc is not None
    inbox = f"_INBOX.fuzz-stranger.{uuid.uuid4().hex}"
    sub = await stranger.nc.subscribe(inbox)
    await stranger.nc.publish(subject, payload, reply=inbox)
    replies: list[bytes] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=silence_s)
            replies.append(msg.data)
            if json.loads(msg.data).get("kind") in ("end", "fail"):
                return replies
    except nats.errors.TimeoutError:
        return replies
    finally:
        await sub.unsubscribe()


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(payload=almost_valid(st.builds(lambda job, fresh: {**job, "job_id": str(fresh)},
                                      jobs | jobs | jobs | resumed_jobs, st.uuids())),
       directed=st.booleans())
def test_a_strangers_job_gets_a_well_formed_stream_or_nothing(
    stack: LocalStack, stranger: Stranger, bus_log: LogWatch, payload: bytes, directed: bool,
) -> None:
    """A job the neuron can decode, for the model its subject names (with a job id never
    cancelled: those it drops on purpose), is answered with the stream protocol (`JobAccepted`,
    chunks with contiguous ``seq``, exactly one terminal event; or one `JobFailed`); one it
    cannot decode is dropped (logged)."""
    subject = (node_job_subject(NODE, MODEL, root=ROOT) if directed
               else job_subject(MODEL, root=ROOT))
    try:
        job = codec.decode_job_request(payload)
    except codec.BusDecodeError:
        assert stranger.call(_run_job(stranger, payload, subject, silence_s=0.2)) == []
        return
    if job.model != MODEL:  # not what the subject serves: dropped, or refused
        replies = stranger.call(_run_job(stranger, payload, subject, silence_s=0.3))
        assert [type(codec.decode_job_event(r)).__name__ for r in replies] in ([], ["JobFailed"])
        return
    replies = stranger.call(_run_job(stranger, payload, subject, silence_s=3.0))
    events = [codec.decode_job_event(r) for r in replies]
    assert events, "a decodable job got no answer"
    assert [e.seq for e in events] == list(range(len(events)))
    assert all(e.job_id == job.job_id for e in events)
    kinds = [type(e).__name__ for e in events]
    assert kinds[-1] in ("JobFinished", "JobFailed"), kinds
    assert kinds == ["JobFailed"] or (kinds[0] == "JobAccepted"
                                      and all(k == "TokenChunk" for k in kinds[1:-1])), kinds
    assert_alive(stack, stranger)
    bus_log.check()


def test_both_sides_serve_after_the_fuzzing(
    stack: LocalStack, stranger: Stranger, bus_log: LogWatch
) -> None:
    wait_until_serving(stack, stranger)
    assert_a_real_request_succeeds(stack)
    assert_alive(stack, stranger)
    assert not stranger.errors
    bus_log.check()


def test_deep_nesting_in_an_unknown_field_is_an_undecodable_message(
    stack: LocalStack, stranger: Stranger, bus_log: LogWatch
) -> None:
    """Found by the fuzzing: msgspec skips an unknown field recursively, and the RecursionError of
    a deep one escaped `bus_schema.codec` (not a `BusDecodeError`): out of the gateway's fleet
    callback and the neuron's job callback (nats-py reported it as a NATS error), and out of
    the neuron's control task, which then never answered."""
    def nested(kind: str) -> bytes:
        return b'{"kind":"%s","x":' % kind.encode() + b"[" * 5000 + b"]" * 5000 + b"}"

    async def ask_control() -> bytes:
        assert stranger.nc is not None
        reply = await stranger.nc.request(control_subject(NODE, "pin", root=ROOT),
                                          nested("pin"), timeout=5)
        return reply.data

    stranger.call(stranger.publish([
        (heartbeat_subject("deep", root=ROOT), nested("heartbeat"), None, None),
        (node_job_subject(NODE, MODEL, root=ROOT), nested("job"), "_INBOX.fuzz-stranger.deep",
         None),
    ]))
    answer = codec.decode_control_reply(stranger.call(ask_control()))
    assert (answer.status, answer.message) == (400, "message is nested too deeply")
    assert_alive(stack, stranger)
    time.sleep(0.05)
    bus_log.check()


# --------------------------------------------------- events injected into a live job's stream

LIVE: Final = "<live job id>"
injected_events = st.one_of(
    st.fixed_dictionaries({"kind": st.just("tok"), "job_id": st.just(LIVE) | ids, "seq": seqs,
                           "text": st.just("INJECTED")},
                          optional={"token_ids": st.lists(st.integers(-1, 5), max_size=3)}),
    st.fixed_dictionaries({"kind": st.just("end"), "job_id": st.just(LIVE) | ids, "seq": seqs,
                           "finish_reason": st.sampled_from(["stop", "length", "cancelled"]),
                           "usage": st.fixed_dictionaries({
                               "prompt_tokens": st.integers(0, 9),
                               "completion_tokens": st.integers(0, 9)})}),
    st.fixed_dictionaries({"kind": st.just("fail"), "job_id": st.just(LIVE) | ids, "seq": seqs,
                           "code": st.sampled_from(["engine_error", "overloaded", "nonsense"]),
                           "message": text}),
    st.fixed_dictionaries({"kind": st.just("accepted"), "job_id": st.just(LIVE) | ids,
                           "seq": seqs, "node": node_names, "model": model_ids,
                           "prompt_tokens": st.integers(0, 9), "max_tokens": st.integers(0, 9)}),
)


@st.composite
def injections(draw: st.DrawFn) -> tuple[bytes, dict[str, str] | None]:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from([b"", b"garbage", b"{}"])), draw(header_sets)
    event = draw(injected_events)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        event = draw(mutated(event))
    return dump(event).encode("utf-8", "surrogatepass"), None


def _stream_reader(url: str, body: dict[str, JsonValue], out: list[bytes]) -> threading.Thread:
    def read() -> None:
        with httpx.stream("POST", url, json=body, timeout=20) as response:
            out.append(str(response.status_code).encode())
            out.append(response.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


async def _next_live_inbox(stranger: Stranger) -> tuple[str, str]:
    """The inbox and job id of the next job the neuron accepts for the gateway."""
    assert stranger.inbox_events is not None
    while True:
        msg = await stranger.inbox_events.get()
        event = codec.decode_job_event(msg.data)
        if type(event).__name__ == "JobAccepted":
            return msg.subject, event.job_id


async def _drain_inbox_events(stranger: Stranger) -> None:
    assert stranger.inbox_events is not None
    while not stranger.inbox_events.empty():
        stranger.inbox_events.get_nowait()


def check_openai_stream(status_and_body: list[bytes]) -> str:
    """The stream is a 200 of well-formed SSE ending with exactly one ``[DONE]``; returns the
    content the client saw."""
    status, raw = status_and_body
    assert status == b"200", raw[:300]
    blocks = raw.decode().split("\n\n")
    assert blocks[-1] == "", raw[-100:]
    data = [b.removeprefix("data: ") for b in blocks[:-1] if not b.startswith(":")]
    assert data.count("[DONE]") == 1 and data[-1] == "[DONE]", data[-3:]
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("error" not in c for c in chunks[:-1]), "an error event must come last"
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if c.get("choices"))


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(events=st.lists(injections(), min_size=1, max_size=4))
def test_events_injected_into_a_live_stream_end_it_cleanly(
    stack: LocalStack, stranger: Stranger, bus_log: LogWatch,
    events: list[tuple[bytes, dict[str, str] | None]],
) -> None:
    """Whatever arrives in a job's inbox besides its neuron's events (wrong sequence numbers,
    other job ids, a second acceptance, garbage, status headers), the client's stream ends with
    one terminal event and the job does not keep running."""
    wait_until_serving(stack, stranger)
    stranger.call(_drain_inbox_events(stranger))
    out: list[bytes] = []
    reader = _stream_reader(f"{stack.base_url}/v1/chat/completions",
                            {"model": MODEL, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]}, out)
    inbox, job_id = stranger.call(_next_live_inbox(stranger))
    stranger.call(stranger.publish([
        (inbox, payload.replace(LIVE.encode(), job_id.encode()), None, headers)
        for payload, headers in events]))
    reader.join(20)
    assert not reader.is_alive(), "the stream never ended"
    check_openai_stream(out)
    wait_until_serving(stack, stranger)
    assert_alive(stack, stranger)
    bus_log.check()


def test_an_event_of_another_job_is_not_relayed(
    stack: LocalStack, stranger: Stranger
) -> None:
    wait_until_serving(stack, stranger)
    stranger.call(_drain_inbox_events(stranger))
    out: list[bytes] = []
    reader = _stream_reader(f"{stack.base_url}/v1/chat/completions",
                            {"model": MODEL, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]}, out)
    inbox, _ = stranger.call(_next_live_inbox(stranger))
    # seq 1 is the neuron's first chunk, 50 ms after its acceptance: this one comes first
    foreign = dump({"kind": "tok", "job_id": "another-job", "seq": 1, "text": "INJECTED"})
    stranger.call(stranger.publish([(inbox, foreign.encode(), None, None)]))
    reader.join(20)
    content = check_openai_stream(out)
    wait_until_serving(stack, stranger)
    assert "INJECTED" not in content


# ------------------------------------------------------------------ the fleet view's bounds


def test_a_flood_of_forged_nodes_and_models_stays_within_the_bounds(
    nats_server: EmbeddedNatsServer,
) -> None:
    """More new nodes than `MAX_NODES`, and more activations of new models for one node than a
    heartbeat may list (`MAX_LISTED`): the view keeps its bounds and its real node."""
    root = f"faults-fuzz-flood-{uuid.uuid4().hex[:8]}"

    def beat(node: str) -> bytes:
        return codec.encode(Heartbeat(node=node, seq=0, sent_at=time.time(), interval_s=60.0,
                                      started_at=time.time()))

    async def main() -> tuple[int, int, bool]:
        settings = GatewaySettings(nats_url=nats_server.url, root=root, discover_wait_s=0.01)
        bus = GatewayBus(settings, FleetView())
        await bus.start()
        nc = await nats.connect(nats_server.url)
        try:
            await nc.publish(heartbeat_subject("real", root=root), beat("real"))
            for i in range(MAX_NODES + 200):
                await nc.publish(heartbeat_subject(f"forged-{i}", root=root), beat(f"forged-{i}"))
            for i in range(MAX_LISTED + 200):
                activation = {"kind": "activation", "node": "real", "event": "queued",
                              "model": f"org/m{i}", "at": time.time()}
                await nc.publish(activation_subject("real", root=root), json.dumps(activation)
                                 .encode())
            await nc.flush()
            deadline = time.monotonic() + 10
            while (bus.fleet.node("real") is None
                   or len(bus.fleet.node("real").models) < MAX_LISTED):  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the flood did not arrive"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # whatever else was still on its way
            real = bus.fleet.node("real")
            return len(bus.fleet.nodes()), len(real.models) if real else -1, bus.connected
        finally:
            await nc.close()
            await bus.close()

    nodes, models, connected = asyncio.run(main())
    assert connected
    assert nodes == MAX_NODES
    assert models == MAX_LISTED

