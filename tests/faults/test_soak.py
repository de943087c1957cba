"""Load, soak and bus-fault tests with real processes on loopback: two neuron processes serving the
same counting model (`tests.faults.scripted_neuron_main`: instant, known output, one token per
`TokenChunk`), the gateway in this process, clients over real HTTP (httpx, OpenAI dialect, every
stream parsed), and real nats-servers.

- soak: thousands of streamed requests at concurrency 32; every stream has exactly the expected
  text (no lost, duplicated, reordered or misrouted token), one finish, the right usage; a second
  nats-py client on the gateway's reply inbox checks every job stream as it crossed the bus.
- slow client: a raw socket asks for an endless stream and stops reading; the gateway cancels the
  job once its backlog passes `cortex.bus.MAX_BACKLOG_EVENTS`, its memory stays bounded, and when
  the client reads again the stream ends with a clean error event.
- nats-server stopped and restarted on the same port mid-traffic, and one member of a 3-node
  cluster killed mid-traffic: every request ends, with its answer or a clean error in OpenAI's
  shape (never a hang, a reset or a malformed stream), and requests after the fault succeed.

Each test prints one summary line (``pytest -s`` shows it): requests attempted / succeeded /
failed with a clean error / lost, and the times measured. The only time limits are generous
bounds on each request (a hang fails) and on each wait.

The fault scenarios run the gateway with a 5 s stream idle timeout. A job whose terminal event
was published while the gateway was not subscribed (between a restart and its resubscription)
is silent while its neuron still heartbeats: the gateway ends it once the neuron's heartbeats
stop listing it (`cortex.fleet.LOST_AFTER_S`), or at the idle timeout, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import httpx
import nats
import pytest
from nats.aio.msg import Msg

from bus_schema import codec
from bus_schema.messages import JobAccepted, JobEvent, JobFailed, JobFinished, TokenChunk
from bus_schema.subjects import gateway_inbox
from cortex.bus import MAX_BACKLOG_EVENTS
from cortex.embedded_nats import EmbeddedNatsServer
from cortex.settings import GatewaySettings
from tests.faults.cluster import (
    CountingNeuronProcess,
    FaultFleet,
    NatsProcess,
    nats_cluster,
    single_nats,
)
from tests.faults.scripted_neuron_main import expected_text, prompt_tokens, word

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.slow]

MODEL: Final = "soak/counting"
NEURONS: Final = ("na", "nb")
CONCURRENCY: Final = 32
SOAK_REQUESTS: Final = 2000
FAULT_REQUESTS: Final = 500
"""Requests of one fault scenario; the fault strikes after `FAULT_AFTER` of them ended."""
FAULT_AFTER: Final = 150
AFTER_FAULT_REQUESTS: Final = 64
"""Requests sent once the faulty traffic ended: every one must succeed."""
OUTAGE_S: Final = 3.0
"""How long the restarted server stays down: longer than `cortex.fleet.GONE_AFTER_BEATS`
heartbeat intervals, so the gateway also sees every neuron go silent."""
REQUEST_TIMEOUT_S: Final = 45.0
"""Longest a request may take before it counts as a hang (lost)."""
MIB: Final = 1024 * 1024
RSS_GROWTH_BOUND: Final = 48 * MIB
"""The slow-client test's bound on the gateway's memory growth; unbounded, the backlog grows by
tens of MiB per second."""


def _fault_gateway() -> GatewaySettings:
    """The gateway of the fault scenarios: a 5 s idle timeout (see the module docstring)."""
    return GatewaySettings(stream_idle_timeout_s=5.0, accept_timeout_s=10.0)


def _max_tokens(n: int) -> int:
    return 8 + n % 9  # 8..16


def _content(tag: str) -> str:
    return f"[soak:{tag}] count for me"


def _chat(tag: str, max_tokens: int) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": _content(tag)}],
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}


# ------------------------------------------------------------------ one streamed request, judged

Kind = Literal["ok", "clean", "lost"]


@dataclass(frozen=True)
class Result:
    tag: str
    kind: Kind
    """``ok``: the whole expected answer; ``clean``: an error in OpenAI's shape (a status with
    an error body, or an error event then ``[DONE]`` after a correct prefix of the answer);
    ``lost``: anything else (a hang, a reset, a malformed stream, a wrong token)."""
    detail: str
    started: float
    ended: float
    job_id: str = ""


def _error_of(body: object) -> str | None:
    """``type/code: message`` of an OpenAI error body, None if ``body`` is not one."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return None
    error = body["error"]
    if not (isinstance(error, dict) and isinstance(error.get("message"), str)
            and isinstance(error.get("type"), str)):
        return None
    return f"{error['type']}/{error.get('code')}: {error['message']}"


def judge_stream(tag: str, max_tokens: int, events: list[str]) -> tuple[Kind, str]:
    """Judge the ``data:`` payloads of one OpenAI chat stream (see `Result.kind`)."""
    pieces: list[str] = []
    finishes: list[str] = []
    usage: dict[str, object] | None = None
    ids: set[str] = set()
    for index, data in enumerate(events):
        if data == "[DONE]":
            if index != len(events) - 1:
                return "lost", "events after [DONE]"
            break
        try:
            body = json.loads(data)
        except json.JSONDecodeError:
            return "lost", f"malformed event {data[:80]!r}"
        if "error" in body:
            error = _error_of(body)
            if error is None:
                return "lost", f"malformed error event {data[:200]}"
            if events[index + 1:] != ["[DONE]"] or finishes:
                return "lost", f"error event not last, or after the finish: {events[index:]}"
            if "".join(pieces) != expected_text(tag, len(pieces)):
                return "lost", f"wrong text before the error: {''.join(pieces)[:200]!r}"
            return "clean", error
        if body.get("object") != "chat.completion.chunk":
            return "lost", f"not a chunk: {data[:200]}"
        ids.add(body["id"])
        for choice in body["choices"]:
            content = choice["delta"].get("content")
            if content:
                pieces.append(content)
            if choice.get("finish_reason") is not None:
                finishes.append(choice["finish_reason"])
        if body.get("usage") is not None:
            if usage is not None:
                return "lost", "usage sent twice"
            usage = body["usage"]
    else:
        return "lost", f"the stream ended without [DONE] after {len(events)} events"
    text = "".join(pieces)
    if text != expected_text(tag, max_tokens):
        return "lost", f"wrong text {text[:200]!r}"
    if pieces != [word(tag, i) for i in range(max_tokens)]:
        return "lost", "the right text in unexpected pieces"
    if finishes != ["length"]:
        return "lost", f"finish reasons {finishes}"
    want = {"prompt_tokens": prompt_tokens(_content(tag)), "completion_tokens": max_tokens}
    if usage is None or {k: usage.get(k) for k in want} != want:
        return "lost", f"usage {usage}, expected {want}"
    if len(ids) != 1:
        return "lost", f"chunk ids {ids}"
    return "ok", ""


async def one_request(client: httpx.AsyncClient, tag: str, max_tokens: int) -> Result:
    started = time.monotonic()
    job_id = ""

    def result(kind: Kind, detail: str) -> Result:
        return Result(tag, kind, detail, started, time.monotonic(), job_id)

    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with client.stream("POST", "/v1/chat/completions",
                                     json=_chat(tag, max_tokens)) as response:
                job_id = response.headers.get("x-request-id", "")
                if response.status_code != 200:
                    raw = await response.aread()
                    try:
                        error = _error_of(json.loads(raw))
                    except json.JSONDecodeError:
                        error = None
                    if error is None:
                        return result("lost", f"{response.status_code} malformed {raw[:200]!r}")
                    return result("clean", f"{response.status_code} {error}")
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    return result("lost", f"content type {response.headers.get('content-type')}")
                events = [line[len("data: "):] async for line in response.aiter_lines()
                          if line.startswith("data: ")]
    except TimeoutError:
        return result("lost", f"no end within {REQUEST_TIMEOUT_S:g}s")
    except httpx.HTTPError as exc:
        return result("lost", f"{type(exc).__name__}: {exc}")
    kind, detail = judge_stream(tag, max_tokens, events)
    return result(kind, detail)


@dataclass
class Tally:
    """The results of one scenario's requests."""

    results: list[Result] = field(default_factory=list)
    reached: tuple[int, asyncio.Event] | None = None
    """Set the event once this many results are in."""

    def add(self, result: Result) -> None:
        self.results.append(result)
        if self.reached is not None and len(self.results) >= self.reached[0]:
            self.reached[1].set()

    def count(self, kind: Kind) -> int:
        return sum(r.kind == kind for r in self.results)

    def summary(self) -> str:
        return (f"attempted={len(self.results)} succeeded={self.count('ok')} "
                f"failed_cleanly={self.count('clean')} lost={self.count('lost')}")

    def reasons(self, kind: Kind) -> Counter[str]:
        """Details of ``kind`` results counted, with the words that hold numbers (ids, counts)
        taken out, HTTP statuses kept."""
        def general(detail: str) -> str:
            return " ".join(w for w in detail.split()
                            if (len(w) == 3 and w.isdigit()) or not any(c.isdigit() for c in w))

        return Counter(general(r.detail) for r in self.results if r.kind == kind)


async def drive(base_url: str, tally: Tally, *, requests: int, prefix: str,
                concurrency: int = CONCURRENCY) -> None:
    """``requests`` streamed requests, ``concurrency`` at a time, each judged into ``tally``."""
    numbers = itertools.count()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits,
                                 timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as client:

        async def worker() -> None:
            while (n := next(numbers)) < requests:
                tally.add(await one_request(client, f"{prefix}{n}", _max_tokens(n)))

        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())


# ------------------------------------------------------------------ the streams as the bus saw them


@dataclass
class InboxObserver:
    """A second nats-py client subscribed to the gateway's reply inbox: every job stream's events
    as they crossed the bus, checked for the protocol independently of the gateway."""

    streams: dict[str, list[JobEvent]] = field(default_factory=dict)
    undecodable: int = 0

    async def on_msg(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        if token == "discover" or not msg.data:
            return  # fleet discovery answers; no-responders statuses
        try:
            event = codec.decode_job_event(msg.data)
        except codec.BusDecodeError:
            self.undecodable += 1
            return
        self.streams.setdefault(token, []).append(event)

    def check(self) -> tuple[dict[str, str], list[str]]:
        """(job id → node of each accepted, finished stream; the problems found). Checked per
        stream: ``seq`` 0, 1, 2… without gap or repeat; `JobAccepted` first; exactly one
        terminal event, last; token ids 0, 1, 2… across the chunks; the finish's completion
        tokens equal to the ids received."""
        served: dict[str, str] = {}
        problems = [f"{self.undecodable} undecodable events"] if self.undecodable else []
        for token, events in self.streams.items():
            seqs = [e.seq for e in events]
            if seqs != list(range(len(events))):
                problems.append(f"{token}: seq {seqs[:40]}")
                continue
            terminal = [i for i, e in enumerate(events) if isinstance(e, JobFinished | JobFailed)]
            if terminal != [len(events) - 1]:
                problems.append(f"{token}: terminal events at {terminal} of {len(events)}")
                continue
            first, last = events[0], events[-1]
            if isinstance(first, JobFailed):
                continue  # refused at admission (then tried elsewhere under a new inbox)
            if not isinstance(first, JobAccepted):
                problems.append(f"{token}: first event {type(first).__name__}")
                continue
            ids = [i for e in events if isinstance(e, TokenChunk) for i in e.token_ids]
            if ids != list(range(len(ids))):
                problems.append(f"{token}: token ids {ids[:40]}")
            if isinstance(last, JobFinished) and last.usage.completion_tokens != len(ids):
                problems.append(f"{token}: finished with {last.usage.completion_tokens} tokens, "
                                f"{len(ids)} sent")
            served[first.job_id] = first.node
        return served, problems


@contextlib.asynccontextmanager
async def observing(url: str, fleet: FaultFleet) -> AsyncIterator[InboxObserver]:
    settings = fleet.stack.gateway_settings
    observer = InboxObserver()
    nc = await nats.connect(url, name="soak-observer")
    try:
        await nc.subscribe(f"{gateway_inbox(settings.gateway_id, root=settings.root)}.*",
                           cb=observer.on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.flush()
        yield observer
        await nc.flush()
    finally:
        await nc.drain()


# ------------------------------------------------------------------ fleets


def _counting_fleet(nats_url: str, tmp: Path, gateway: GatewaySettings | None = None
                    ) -> FaultFleet:
    source = tmp / "counting.gguf"
    source.write_bytes(b"")
    fleet = FaultFleet(nats_url=nats_url, root=f"soak-{uuid.uuid4().hex[:8]}", log_dir=tmp,
                       gateway=gateway)
    return fleet


def _start(fleet: FaultFleet, tmp: Path) -> None:
    for name in NEURONS:
        fleet.add(name, [(str(tmp / "counting.gguf"), MODEL)], kind=CountingNeuronProcess)
    fleet.wait_ready(timeout_s=60)


@pytest.fixture(scope="module")
def fleet(nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[FaultFleet]:
    tmp = tmp_path_factory.mktemp("soak")
    with _counting_fleet(nats_server.url, tmp) as running:
        _start(running, tmp)
        yield running


def _idle(fleet: FaultFleet) -> None:
    """Every neuron reports no running job, and the gateway has none running."""
    fleet.wait_idle(NEURONS)
    assert all(fleet.running(name) == 0 for name in NEURONS)


# ------------------------------------------------------------------ soak


@pytest.mark.timeout(240)
def test_soak_thousands_of_streams_arrive_whole_and_in_order(
    fleet: FaultFleet, nats_server: EmbeddedNatsServer
) -> None:
    tally = Tally()

    async def run() -> InboxObserver:
        async with observing(nats_server.url, fleet) as observer:
            await drive(fleet.stack.base_url, tally, requests=SOAK_REQUESTS, prefix="s")
        return observer

    started = time.monotonic()
    observer = asyncio.run(run())
    took = time.monotonic() - started
    served, problems = observer.check()
    per_node = Counter(served.values())
    latencies = sorted(r.ended - r.started for r in tally.results)
    print(f"\n[soak] {tally.summary()} in {took:.1f}s ({len(tally.results) / took:.0f} req/s, "
          f"p50 {latencies[len(latencies) // 2] * 1e3:.0f} ms, "
          f"max {latencies[-1] * 1e3:.0f} ms); bus: {len(observer.streams)} job streams checked "
          f"(seq, one terminal, token ids, usage), {len(problems)} problems; served by "
          f"{dict(per_node)}")
    assert len(tally.results) == SOAK_REQUESTS
    assert tally.count("ok") == SOAK_REQUESTS, tally.reasons("lost") + tally.reasons("clean")
    assert not problems, problems[:10]
    job_ids = {r.job_id for r in tally.results}
    assert job_ids <= served.keys(), f"{len(job_ids - served.keys())} jobs not seen on the bus"
    assert set(per_node) == set(NEURONS), per_node
    _idle(fleet)


# ------------------------------------------------------------------ a client that stops reading


def _rss() -> int:
    """This process's resident memory in bytes (the gateway runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _read_chunked(sock: socket.socket, timeout_s: float) -> tuple[bytes, bytes]:
    """Read one chunked HTTP/1.1 response to its end: (head, body)."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b""
    head, rest = data.split(b"\r\n\r\n", 1)
    body = bytearray()
    buffer = bytearray(rest)

    def need(n: int) -> None:
        while len(buffer) < n:
            more = sock.recv(1 << 20)
            assert more, "the connection closed inside the body"
            buffer.extend(more)

    while True:
        need(2)
        while b"\r\n" not in buffer:
            need(len(buffer) + 1)
        line, _, _ = bytes(buffer).partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        need(len(line) + 2 + size + 2)
        body.extend(buffer[len(line) + 2:len(line) + 2 + size])
        del buffer[:len(line) + 2 + size + 2]
        if size == 0:
            return head, bytes(body)


@pytest.mark.timeout(120)
def test_a_client_that_stops_reading_is_cut_off_with_bounded_memory(
    fleet: FaultFleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cortex.bus")
    _idle(fleet)
    tag = "slow"
    body = json.dumps(_chat(tag, 5_000_000)).encode()
    host, port = fleet.stack.base_url.removeprefix("http://").split(":")
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    baseline = peak = _rss()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        started = time.monotonic()
        sock.sendall(request)

        def gave_up() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "fell too far behind" in r.getMessage()]

        deadline = started + 60
        while not gave_up():
            peak = max(peak, _rss())
            assert time.monotonic() < deadline, (
                f"the gateway never gave the slow client up (RSS +{(peak - baseline) / MIB:.0f} "
                "MiB)")
            time.sleep(0.05)
        given_up_at = time.monotonic()
        fleet.wait_idle(NEURONS)  # the neuron's heartbeat: the job was cancelled there
        idle_at = time.monotonic()
        assert all(fleet.running(name) == 0 for name in NEURONS)
        settle = time.monotonic() + 1.0  # still not reading: nothing may pile up any more
        while time.monotonic() < settle:
            peak = max(peak, _rss())
            time.sleep(0.05)
        [record] = gave_up()
        head, stream = _read_chunked(sock, timeout_s=20)

    assert head.startswith(b"HTTP/1.1 200"), head
    events = [e.removeprefix(b"data: ").decode() for e in stream.split(b"\n\n")
              if e.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "stream_broken"
    assert error["message"].startswith("the client fell too far behind")
    pieces = [c["delta"].get("content") or ""
              for e in events[:-2] for c in json.loads(e)["choices"]]
    delivered = "".join(pieces)
    assert delivered == expected_text(tag, len([p for p in pieces if p])), "not a prefix"
    growth = peak - baseline
    print(f"\n[slow client] attempted=1 succeeded=0 failed_cleanly=1 lost=0; "
          f"gave up {given_up_at - started:.1f}s after the request "
          f"({record.getMessage().split('(')[1].split(')')[0]}; bound {MAX_BACKLOG_EVENTS} "
          f"events or 4 MiB); neuron idle {idle_at - given_up_at:.1f}s later; client received "
          f"{len(stream) / MIB:.1f} MiB, {len(events) - 2} chunks before the error; "
          f"gateway RSS +{growth / MIB:.1f} MiB (peak {peak / MIB:.0f} MiB)")
    assert record.getMessage().startswith("job=")
    assert growth < RSS_GROWTH_BOUND, f"the gateway grew by {growth / MIB:.0f} MiB"
    _idle(fleet)


# ------------------------------------------------------------------ faults on the bus


@dataclass
class FaultTimes:
    """Monotonic times of a fault and what followed it."""

    fault: float = 0.0
    recovered: float = 0.0
    """Restart done (restart), or the gateway connected to a surviving member (cluster)."""
    gateway_back: float = 0.0
    """The gateway's bus connected again."""
    notes: dict[str, float] = field(default_factory=dict)
    label: str = ""


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> float:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not in {timeout_s:g}s"
        time.sleep(0.02)
    return time.monotonic()


def _faulty_traffic(fleet: FaultFleet, inject: Callable[[], None]) -> tuple[Tally, Tally]:
    """`FAULT_REQUESTS` requests with ``inject`` run (in a thread) once `FAULT_AFTER` ended,
    then `AFTER_FAULT_REQUESTS` more."""
    during, after = Tally(), Tally()

    async def run() -> None:
        reached = asyncio.Event()
        during.reached = (FAULT_AFTER, reached)

        async def fault() -> None:
            await reached.wait()
            await asyncio.to_thread(inject)

        async with asyncio.TaskGroup() as group:
            group.create_task(fault())
            group.create_task(drive(fleet.stack.base_url, during, requests=FAULT_REQUESTS,
                                    prefix="f"))
        await drive(fleet.stack.base_url, after, requests=AFTER_FAULT_REQUESTS, prefix="a")

    asyncio.run(run())
    return during, after


def _report(name: str, during: Tally, after: Tally, times: FaultTimes) -> None:
    in_flight = [r for r in during.results if r.started < times.fault < r.ended]
    started = [r for r in during.results if times.fault <= r.started < times.recovered]
    first_ok = min((r.ended for r in during.results + after.results
                    if r.kind == "ok" and r.started >= times.recovered), default=float("nan"))
    notes = "".join(f", {k} {v:.2f}s" for k, v in times.notes.items())
    print(f"\n[{name}]{times.label} {during.summary()} (in flight at the fault: "
          f"{len(in_flight)}, {sum(r.kind == 'ok' for r in in_flight)} of them succeeded; "
          f"started during the outage: {len(started)}, "
          f"{sum(r.kind == 'ok' for r in started)} succeeded); after: {after.summary()}; "
          f"gateway reconnected "
          f"{times.gateway_back - times.fault:.2f}s after the fault{notes}, first success "
          f"{first_ok - times.fault:.2f}s after it; clean errors: "
          f"{dict(during.reasons('clean'))}; lost: {dict(during.reasons('lost'))}")


def _check_fault_run(fleet: FaultFleet, during: Tally, after: Tally, times: FaultTimes) -> None:
    assert len(during.results) == FAULT_REQUESTS
    assert during.count("lost") == 0, during.reasons("lost")
    assert during.count("ok") > FAULT_AFTER // 2
    assert [r for r in during.results if r.kind == "ok" and r.started > times.gateway_back], \
        "nothing succeeded after the fault"
    assert after.count("ok") == AFTER_FAULT_REQUESTS, after.reasons("lost") + after.reasons("clean")
    _idle(fleet)


@pytest.mark.timeout(180)
def test_requests_survive_a_nats_server_restart(tmp_path: Path) -> None:
    server = single_nats(tmp_path)
    server.start()
    try:
        with _counting_fleet(server.url, tmp_path, _fault_gateway()) as fleet:
            _start(fleet, tmp_path)
            bus = fleet.stack.bus
            assert bus is not None
            times = FaultTimes()

            def restart() -> None:
                times.fault = time.monotonic()
                server.stop()
                times.notes["gateway saw the outage"] = (
                    _wait(lambda: not bus.connected, "outage noticed") - times.fault)
                time.sleep(OUTAGE_S)
                server.start()
                times.recovered = time.monotonic()
                times.notes["server down"] = times.recovered - times.fault
                times.gateway_back = _wait(lambda: bus.connected, "gateway reconnected")

            during, after = _faulty_traffic(fleet, restart)
            _report("nats restart", during, after, times)
            _check_fault_run(fleet, during, after, times)
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_requests_survive_losing_a_member_of_a_3_node_cluster(tmp_path: Path) -> None:
    members = nats_cluster(tmp_path)
    try:
        urls = ",".join(m.url for m in members)
        with _counting_fleet(urls, tmp_path, _fault_gateway()) as fleet:
            _start(fleet, tmp_path)
            bus = fleet.stack.bus
            assert bus is not None
            gateway = f"cortex:{fleet.stack.gateway_settings.gateway_id}"
            [victim] = [m for m in members if gateway in m.client_names()]
            survivors = [m for m in members if m is not victim]
            cut_off = sorted(n for n in victim.client_names()
                             if n.startswith(("cortex:", "neuron:")))
            times = FaultTimes()

            def on(member: NatsProcess) -> bool:
                return gateway in member.client_names()

            def kill() -> None:
                times.fault = time.monotonic()
                victim.kill()
                times.recovered = times.gateway_back = _wait(
                    lambda: any(on(m) for m in survivors), "gateway on a surviving member")

            during, after = _faulty_traffic(fleet, kill)
            [now_on] = [m.name for m in survivors if on(m)]
            times.label = (f" ({victim.name} killed with {', '.join(cut_off)} on it; the gateway "
                           f"moved to {now_on})")
            _report("cluster member killed", during, after, times)
            _check_fault_run(fleet, during, after, times)
    finally:
        for member in members:
            member.stop()
