"""Load generation for bench/gateway.py: streamed requests over HTTP (OpenAI SSE) and straight on
the bus (the job stream protocol), a bounded closed-loop runner, and the statistics.

Every request is timed from just before it is sent: TTFT stops at the first content (the first
SSE event whose ``delta.content`` is non-empty, or the first `TokenChunk` with text), total at the
end of the stream. A request counts only if it ends normally with the expected number of tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import httpx
import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from bus_schema import codec
from bus_schema.messages import (
    ChatMessage,
    JobAccepted,
    JobFailed,
    JobFinished,
    JobRequest,
    SamplingParams,
    TokenChunk,
)
from bus_schema.subjects import Headers, job_subject

PROMPT: Final = "Say something."


class BenchError(Exception):
    """A request did not complete as expected."""


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_s: float
    total_s: float
    content_events: int
    """SSE events with content, or `TokenChunk`s: how the tokens were batched on the way."""
    tokens: int


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (the same rule as bench/ttft.py)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class LevelRun:
    """One closed-loop run: ``concurrency`` workers, each sending its next request when the last
    one ended, until ``count`` requests were sent or the time bound passed."""

    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.samples) / self.wall_s if self.wall_s else 0.0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    def ttft_ms(self, q: float) -> float:
        return percentile([s.ttft_s for s in self.samples], q) * 1e3

    def total_ms(self, q: float) -> float:
        return percentile([s.total_s for s in self.samples], q) * 1e3

    def events_per_request(self) -> float:
        return sum(s.content_events for s in self.samples) / max(1, len(self.samples))


async def run_level(
    one: Callable[[], Awaitable[Sample]], *, concurrency: int, count: int, limit_s: float
) -> LevelRun:
    run = LevelRun(concurrency=concurrency)
    issued = 0
    deadline = time.monotonic() + limit_s

    async def worker() -> None:
        nonlocal issued
        while issued < count and time.monotonic() < deadline:
            issued += 1
            try:
                run.samples.append(await one())
            except (BenchError, OSError, asyncio.IncompleteReadError, ValueError,
                    msgspec.DecodeError, nats.errors.Error, TimeoutError) as exc:
                run.failures.append(f"{type(exc).__name__}: {exc}"[:300])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - started
    return run


# --------------------------------------------------------------------------- HTTP (OpenAI SSE)


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: msgspec.Raw | None = None


_chunk_decoder: Final = msgspec.json.Decoder(_Chunk)


class SseClient:
    """Streamed OpenAI chat completions over HTTP/1.1 keep-alive connections, one per request in
    flight, reused (at most ``pool`` kept).

    A minimal client on asyncio streams: httpx costs 3.3 ms of client CPU per 32-event stream at
    1 stream and 12 ms at 64 on this machine, which capped every path at under 100 requests/s
    and measured the client, not the proxy.
    """

    def __init__(self, base_url: str, model: str, *, pool: int, timeout_s: float) -> None:
        url = httpx.URL(base_url)
        self._host = url.host
        self._port = url.port or 80
        self._target = f"{url.path.rstrip('/')}/v1/chat/completions".encode()
        self._model = model
        self._pool = pool
        self._timeout_s = timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def request(self, max_tokens: int) -> bytes:
        body = msgspec.json.encode({
            "model": self._model, "stream": True, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPT}],
        })
        head = (b"POST " + self._target + b" HTTP/1.1\r\nHost: "
                + f"{self._host}:{self._port}".encode()
                + b"\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
                + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        return head + body

    async def stream(self, max_tokens: int) -> Sample:
        request = self.request(max_tokens)
        started = time.perf_counter()
        async with asyncio.timeout(self._timeout_s):
            while True:
                reused = bool(self._idle)
                reader, writer = (self._idle.pop() if reused else
                                  await asyncio.open_connection(self._host, self._port))
                try:
                    writer.write(request)
                    status = await reader.readline()
                    if not status and reused:  # the server closed an idle connection: retry
                        writer.close()
                        continue
                    sample, keep = await self._response(status, reader, started, max_tokens)
                except BaseException:
                    writer.close()
                    raise
                if keep and len(self._idle) < self._pool:
                    self._idle.append((reader, writer))
                else:
                    writer.close()
                return sample

    async def _response(
        self, status: bytes, reader: asyncio.StreamReader, started: float, max_tokens: int
    ) -> tuple[Sample, bool]:
        parts = status.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise BenchError(f"bad status line {status[:100]!r}")
        chunked = False
        length: int | None = None
        keep = parts[0] == b"HTTP/1.1"
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                keep = value != b"close"
        sse = _SseParser()
        if chunked:
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                sse.feed((await reader.readexactly(size + 2))[:-2])
        elif length is not None:
            sse.feed(await reader.readexactly(length))
        else:
            sse.feed(await reader.read())
            keep = False
        ended = time.perf_counter()
        if parts[1] != b"200":
            raise BenchError(f"HTTP {parts[1].decode()}: {sse.raw[:200]!r}")
        return sse.sample(started, ended, max_tokens), keep


class _SseParser:
    """OpenAI ``data:`` events, fed as bytes arrive; notes when the first content came."""

    def __init__(self) -> None:
        self.raw = b""
        self.first: float | None = None
        self.events = 0
        self.usage: _Usage | None = None
        self.done = False
        self._pending = b""

    def feed(self, data: bytes) -> None:
        if not self.raw:
            self.raw = data[:200]
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            chunk = _chunk_decoder.decode(payload)
            if chunk.error is not None:
                raise BenchError(f"error event: {bytes(chunk.error)[:200]!r}")
            if chunk.usage is not None:
                self.usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                self.events += 1
                if self.first is None:
                    self.first = time.perf_counter()

    def sample(self, started: float, ended: float, max_tokens: int) -> Sample:
        if self.first is None or not self.done:
            missing = "content" if self.first is None else "[DONE]"
            raise BenchError(f"stream ended without {missing}")
        usage = self.usage
        if usage is None or usage.completion_tokens != max_tokens:
            raise BenchError(f"expected {max_tokens} tokens, usage says "
                             f"{usage.completion_tokens if usage else None}")
        return Sample(self.first - started, ended - started, self.events, usage.completion_tokens)


# --------------------------------------------------------------------------- the bus floor


class BusClient:
    """Jobs sent straight to the neurons, as a gateway sends them: one connection, one wildcard
    inbox subscription, each job's events routed by the last subject token."""

    def __init__(self, nats_url: str, model: str, *, root: str, timeout_s: float) -> None:
        self._url = nats_url
        self._model = model
        self._subject = job_subject(model, root=root)
        self._timeout_s = timeout_s
        self._inbox = f"_INBOX.bench{uuid.uuid4().hex[:8]}"
        self._streams: dict[str, asyncio.Queue[Msg]] = {}
        self._nc: NatsClient | None = None

    async def start(self) -> None:
        self._nc = await nats.connect(self._url, name="bench")
        await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_inbox)
        await self._nc.flush()

    async def aclose(self) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def _on_inbox(self, msg: Msg) -> None:
        queue = self._streams.get(msg.subject.rpartition(".")[2])
        if queue is not None:
            queue.put_nowait(msg)

    async def stream(self, max_tokens: int) -> Sample:
        assert self._nc is not None
        token = uuid.uuid4().hex
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._streams[token] = queue
        job = JobRequest(job_id=token, model=self._model, gateway="bench",
                         messages=(ChatMessage(role="user", content=PROMPT),),
                         params=SamplingParams(max_tokens=max_tokens))
        started = time.perf_counter()
        first: float | None = None
        events = 0
        seq = 0
        try:
            await self._nc.publish(self._subject, codec.encode(job),
                                   reply=f"{self._inbox}.{token}",
                                   headers={Headers.JOB_ID: token, Headers.MODEL: self._model})
            async with asyncio.timeout(self._timeout_s):
                while True:
                    msg = await queue.get()
                    if not msg.data and msg.headers and msg.headers.get("Status"):
                        raise BenchError(f"bus status {msg.headers.get('Status')}")
                    event = codec.decode_job_event(msg.data)
                    if isinstance(event, JobAccepted):
                        continue
                    if isinstance(event, JobFailed):
                        raise BenchError(f"job failed: {event.code} {event.message}")
                    seq += 1
                    if event.seq != seq:
                        raise BenchError(f"seq {event.seq}, expected {seq}")
                    if isinstance(event, TokenChunk):
                        if event.text:
                            events += 1
                            if first is None:
                                first = time.perf_counter()
                        continue
                    assert isinstance(event, JobFinished)
                    ended = time.perf_counter()
                    tokens = event.usage.completion_tokens
                    break
        finally:
            self._streams.pop(token, None)
        if first is None or tokens != max_tokens:
            raise BenchError(f"expected {max_tokens} tokens, got {tokens}")
        return Sample(first - started, ended - started, events, tokens)
