"""What the gateway adds on top of the bus floor, and the same for LiteLLM as a reference.

Separate processes, as deployed: a nats-server, a neuron whose model costs nothing
(bench/instant_neuron.py: the real `Worker` with an instant engine), ``cortex serve`` on its own
port, and, for the reference, LiteLLM's proxy (from its own venv, .bench-venv) in front of an
instant OpenAI-compatible upstream (bench/instant_upstream.py). This process is the only client.

Paths, each measured at 1, 64 and 256 concurrent streams of 32 tokens (closed loop):
- bus: `JobRequest`s published straight on the bus, events read from the reply inbox (the floor
  under the gateway);
- cortex: OpenAI streamed chat completions through ``cortex serve`` (bench/loadgen.py's small
  asyncio HTTP/1.1 client, keep-alive pool sized to the concurrency, SSE parsed here);
- upstream: the same requests straight to the instant upstream (the floor under LiteLLM);
- litellm: the same requests through LiteLLM's proxy.
Then relay throughput: 16 concurrent streams of 4096 tokens on the bus and through the gateway.

Run:  .venv/bin/python bench/gateway.py [--quick] [--no-litellm] [--out bench/results/gateway.md]
LiteLLM, once:  python3.11 -m venv .bench-venv &&
                .bench-venv/bin/pip install 'litellm[proxy]==1.106.2'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Final, NoReturn

import httpx
from loadgen import BusClient, LevelRun, Sample, SseClient, run_level

from cortex.embedded_nats import EmbeddedNatsServer

ROOT: Final = Path(__file__).resolve().parent.parent
BENCH_VENV: Final = ROOT / ".bench-venv"
MODEL: Final = "bench/instant"
SUBJECT_ROOT: Final = "bench"
TOKENS: Final = 32
RELAY_STREAMS: Final = 16
RELAY_TOKENS: Final = 4096
REQUEST_TIMEOUT_S: Final = 120.0
MIB: Final = 1024 * 1024
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    levels: tuple[tuple[int, int], ...]
    """(concurrent streams, requests) per level."""
    limit_s: float
    """Time bound per path and level: no new request starts after it."""
    relay_rounds: int


FULL: Final = Plan(levels=((1, 1000), (64, 2000), (256, 2000)), limit_s=60.0, relay_rounds=3)
QUICK: Final = Plan(levels=((1, 30), (64, 256), (256, 512)), limit_s=10.0, relay_rounds=1)


class SetupError(RuntimeError):
    """A process did not start or did not become ready."""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ProcUsage:
    cpu_s: float
    rss_bytes: int


class Child:
    """A child process in its own session (Ctrl-C reaches only us; we stop it in order), with
    its output in a log file. CPU and RSS are summed over its process group."""

    def __init__(self, name: str, cmd: list[str], logs: Path, env: dict[str, str] | None = None):
        self.name = name
        self.cmd = cmd
        self.log = logs / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(env or {})})

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise SetupError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def usage(self) -> ProcUsage:
        cpu_ticks = 0
        rss_kib = 0
        for pid in self._group():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                cpu_ticks += int(fields[11]) + int(fields[12])  # utime, stime
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss_kib += int(line.split()[1])
        return ProcUsage(cpu_ticks / CLK_TCK, rss_kib * 1024)

    def _group(self) -> Iterator[int]:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = (entry / "stat").read_text().rpartition(")")[2].split()
                    if int(fields[2]) == self.proc.pid:  # pgrp
                        yield int(entry.name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        # anything else left in its group (a worker it spawned)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def wait_until(child: Child, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``ready`` until it is true; stop the child and raise `SetupError` if it exits or
    the time runs out."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            child.check()
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.2)
        raise SetupError(f"{child.name}: {what} not ready within {timeout_s:.0f}s:\n"
                         f"{child.tail()}")
    except BaseException:
        child.stop()
        raise


def start_neuron(nats_url: str, logs: Path) -> Child:
    child = Child("neuron", [sys.executable, "-m", "bench.instant_neuron", "--nats-url", nats_url,
                             "--root", SUBJECT_ROOT, "--model-id", MODEL,
                             "--tokens", str(RELAY_TOKENS), "--max-jobs", "1024"], logs)
    wait_until(child, lambda: "READY" in child.log.read_text(errors="replace"), 60, "model")
    return child


def cortex_command() -> list[str]:
    script = Path(sys.executable).parent / "cortex"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cortex"]


def start_gateway(nats_url: str, logs: Path) -> tuple[Child, str]:
    port = free_port()
    child = Child("cortex", [*cortex_command(), "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--nats-url", nats_url, "--root", SUBJECT_ROOT,
                             "--log-level", "warning"], logs)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        data = httpx.get(f"{base}/v1/models", timeout=2).json()["data"]
        return any(m["id"] == MODEL and m.get("loaded", True) for m in data)

    wait_until(child, ready, 60, "gateway with the model")
    return child, base


def start_upstream(logs: Path) -> tuple[Child, str]:
    port = free_port()
    child = Child("upstream", [sys.executable, "-m", "bench.instant_upstream", "--port",
                               str(port), "--tokens", str(RELAY_TOKENS)], logs)
    base = f"http://127.0.0.1:{port}"
    wait_until(child, lambda: httpx.get(f"{base}/v1/models", timeout=2).status_code == 200, 30,
               "upstream")
    return child, base


LITELLM_CONFIG: Final = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/instant
      api_base: {upstream}/v1
      api_key: unused
litellm_settings:
  telemetry: false
  drop_params: true
  turn_off_message_logging: true
general_settings:
  disable_spend_logs: true
  disable_error_logs: true
"""


def litellm_version() -> str | None:
    python = BENCH_VENV / "bin" / "python"
    if not (BENCH_VENV / "bin" / "litellm").is_file():
        return None
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                          "print(m.version('litellm'))"], capture_output=True, text=True,
                         timeout=60, check=False)
    return out.stdout.strip() or None


def start_litellm(upstream: str, logs: Path) -> tuple[Child, str]:
    config = logs / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(model=MODEL, upstream=upstream))
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False",
           # no master key, as Cortex has no API keys: 1.106 refuses to start without one
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
    child = Child("litellm", [str(BENCH_VENV / "bin" / "litellm"), "--config", str(config),
                              "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                  logs, env)
    base = f"http://127.0.0.1:{port}"
    wait_until(child, lambda: httpx.get(f"{base}/health/liveliness", timeout=2).status_code
               == 200, 240, "LiteLLM proxy")
    return child, base


# --------------------------------------------------------------------------- measurement


@dataclass
class Measured:
    path: str
    concurrency: int
    run: LevelRun
    proxy: str | None = None
    """Whose CPU and RSS were read (the gateway or LiteLLM); None for the floors."""
    cpu_s: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    client_cpu_s: float = 0.0
    """This process (the client) over the measured requests."""


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Relay:
    path: str
    run: LevelRun
    cpu_s: float | None = None


@dataclass
class Results:
    levels: list[Measured] = field(default_factory=list)
    relays: list[Relay] = field(default_factory=list)
    gateway_rss_idle: int = 0
    gateway_rss_first: int = 0
    """After the first level's warm-up, before any measured request."""
    gateway_rss_end: int = 0
    litellm_rss_idle: int = 0
    litellm_rss_end: int = 0


@dataclass
class Route:
    """One way of sending a streamed request, and the proxy process it measures, if any."""

    name: str
    send: Callable[[int], Awaitable[Sample]]
    proxy: Child | None


async def warm_up(path: Route, concurrency: int) -> None:
    """One request per pooled connection (or 20 in a row): connections open, caches fill."""
    run = await run_level(functools.partial(path.send, TOKENS), concurrency=concurrency,
                          count=max(20, concurrency), limit_s=60)
    if not run.samples:
        raise SetupError(f"{path.name}: warm-up failed: {run.failures[:3]}")


async def measure(plan: Plan, bus: BusClient, gateway: tuple[Child, str],
                  litellm: tuple[Child, str, str] | None, results: Results) -> None:
    gw_child, gw_base = gateway
    results.gateway_rss_idle = gw_child.usage().rss_bytes
    if litellm is not None:
        results.litellm_rss_idle = litellm[0].usage().rss_bytes
    for concurrency, count in plan.levels:
        clients: list[SseClient] = []

        def sse(base: str, clients: list[SseClient] = clients,
                concurrency: int = concurrency) -> Callable[[int], Awaitable[Sample]]:
            client = SseClient(base, MODEL, pool=concurrency, timeout_s=REQUEST_TIMEOUT_S)
            clients.append(client)
            return client.stream

        paths = [Route("bus", bus.stream, None), Route("cortex", sse(gw_base), gw_child)]
        if litellm is not None:
            paths += [Route("upstream", sse(litellm[2]), None),
                      Route("litellm", sse(litellm[1]), litellm[0])]
        try:
            for path in paths:
                await warm_up(path, concurrency)
                if path.proxy is gw_child and not results.gateway_rss_first:
                    results.gateway_rss_first = gw_child.usage().rss_bytes
                before = path.proxy.usage() if path.proxy else None
                client_before = client_cpu()
                run = await run_level(functools.partial(path.send, TOKENS),
                                      concurrency=concurrency, count=count, limit_s=plan.limit_s)
                measured = Measured(path.name, concurrency, run,
                                    client_cpu_s=client_cpu() - client_before)
                if path.proxy is not None and before is not None:
                    after = path.proxy.usage()
                    measured.proxy = path.proxy.name
                    measured.cpu_s = after.cpu_s - before.cpu_s
                    measured.rss_before, measured.rss_after = before.rss_bytes, after.rss_bytes
                    path.proxy.check()
                results.levels.append(measured)
                print(progress_line(measured), flush=True)
        finally:
            for client in clients:
                await client.aclose()
    relay_client = SseClient(gw_base, MODEL, pool=RELAY_STREAMS, timeout_s=REQUEST_TIMEOUT_S)
    try:
        for name, send, child in (("bus", bus.stream, None),
                                  ("cortex", relay_client.stream, gw_child)):
            before = child.usage() if child else None
            run = await run_level(functools.partial(send, RELAY_TOKENS),
                                  concurrency=RELAY_STREAMS,
                                  count=RELAY_STREAMS * plan.relay_rounds, limit_s=plan.limit_s)
            relay = Relay(name, run)
            if child is not None and before is not None:
                relay.cpu_s = child.usage().cpu_s - before.cpu_s
            results.relays.append(relay)
            print(f"relay {name:8s} {run.tokens / run.wall_s if run.wall_s else 0:>12,.0f} "
                  f"tokens/s ({len(run.samples)} streams, {len(run.failures)} failed)",
                  flush=True)
    finally:
        await relay_client.aclose()
    results.gateway_rss_end = gw_child.usage().rss_bytes
    if litellm is not None:
        results.litellm_rss_end = litellm[0].usage().rss_bytes


def progress_line(m: Measured) -> str:
    r = m.run
    if not r.samples:
        return f"{m.concurrency:4d} {m.path:8s} all {len(r.failures)} failed: {r.failures[:1]}"
    return (f"{m.concurrency:4d} {m.path:8s} {len(r.samples):5d} ok {len(r.failures):4d} failed "
            f"{r.rate:8.1f} req/s  TTFT p50 {r.ttft_ms(0.5):7.2f} p99 {r.ttft_ms(0.99):7.2f}  "
            f"total p50 {r.total_ms(0.5):7.2f} p99 {r.total_ms(0.99):7.2f} ms")


# --------------------------------------------------------------------------- report


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_revision() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=30, check=False)
        return out.stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "cortex", "neuron", "bus_schema")
    return rev + (" + uncommitted changes in cortex/ neuron/ bus_schema/" if dirty else "")


LEVEL_HEADER: Final = (
    "| streams | path | requests | req/s | TTFT p50 | TTFT p99 | total p50 | total p99 | "
    "content events/req | proxy CPU ms/req | proxy RSS MiB | client CPU ms/req |\n"
    + "|---" * 12 + "|"
)


def level_row(m: Measured) -> str:
    r = m.run
    failed = f" ({len(r.failures)} failed)" if r.failures else ""
    if not r.samples:
        return f"| {m.concurrency} | {m.path} | 0{failed} |" + " – |" * 9
    cpu = f"{m.cpu_s * 1e3 / len(r.samples):.2f}" if m.proxy else "–"
    rss = f"{m.rss_before / MIB:.0f} → {m.rss_after / MIB:.0f}" if m.proxy else "–"
    return (f"| {m.concurrency} | {m.path} | {len(r.samples)}{failed} | {r.rate:.1f} | "
            f"{r.ttft_ms(0.5):.2f} | {r.ttft_ms(0.99):.2f} | {r.total_ms(0.5):.2f} | "
            f"{r.total_ms(0.99):.2f} | {r.events_per_request():.1f} | {cpu} | {rss} | "
            f"{m.client_cpu_s * 1e3 / len(r.samples):.2f} |")


def find(results: Results, path: str, concurrency: int) -> Measured | None:
    return next((m for m in results.levels if m.path == path and m.concurrency == concurrency
                 and m.run.samples), None)


@dataclass(frozen=True)
class Added:
    ttft_p50: float
    ttft_p99: float
    total_p50: float
    total_p99: float


def added(proxy: Measured, floor: Measured) -> Added:
    p, f = proxy.run, floor.run
    return Added(p.ttft_ms(0.5) - f.ttft_ms(0.5), p.ttft_ms(0.99) - f.ttft_ms(0.99),
                 p.total_ms(0.5) - f.total_ms(0.5), p.total_ms(0.99) - f.total_ms(0.99))


def relay_target(results: Results) -> tuple[str, bool | None]:
    """Judged end to end when the bus floor itself reaches the target; otherwise the neuron and
    this client, on the same cores, set the ceiling, and the gateway is judged on its capacity:
    tokens relayed per second of its own CPU (what it relays with one core to itself)."""
    gw = next((r for r in results.relays if r.path == "cortex" and r.run.samples), None)
    floor = next((r for r in results.relays if r.path == "bus" and r.run.samples), None)
    if gw is None or gw.run.wall_s <= 0:
        return "not measured", None
    rate = gw.run.tokens / gw.run.wall_s
    floor_rate = floor.run.tokens / floor.run.wall_s if floor and floor.run.wall_s else 0.0
    capacity = gw.run.tokens / gw.cpu_s if gw.cpu_s else float("inf")
    if floor_rate >= 100_000:
        return (f"{rate:,.0f} tokens/s end to end (bus floor {floor_rate:,.0f}; gateway capacity "
                f"{capacity:,.0f} tokens per CPU-second)"), rate >= 100_000
    return (f"judged on capacity, {capacity:,.0f} tokens per gateway CPU-second; end to end "
            f"{rate:,.0f} tokens/s, under a bus floor of {floor_rate:,.0f} tokens/s (the neuron, "
            "this client and nats-server share the cores, so the floor caps what any path "
            "shows here)"), capacity >= 100_000


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def report(args: argparse.Namespace, plan: Plan, results: Results, litellm_note: str,
           started: datetime, load_before: str) -> str:
    levels = sorted({m.concurrency for m in results.levels})
    rows = [level_row(m) for m in results.levels]
    added_rows: list[str] = []
    for c in levels:
        for proxy, floor in (("cortex", "bus"), ("litellm", "upstream")):
            p, f = find(results, proxy, c), find(results, floor, c)
            if p and f:
                a = added(p, f)
                added_rows.append(
                    f"| {c} | {proxy} − {floor} | {a.ttft_p50:+.2f} | {a.ttft_p99:+.2f} | "
                    f"{a.total_p50:+.2f} | {a.total_p99:+.2f} | {p.run.rate:.1f} / "
                    f"{f.run.rate:.1f} |")
    relay_rows = []
    for relay in results.relays:
        r = relay.run
        rate = r.tokens / r.wall_s if r.wall_s else 0.0
        cpu = (f"{relay.cpu_s:.2f} s ({relay.cpu_s * 1e6 / max(1, r.tokens):.1f} µs/token)"
               if relay.cpu_s is not None else "–")
        relay_rows.append(f"| {relay.path} | {len(r.samples)} ({len(r.failures)} failed) | "
                          f"{r.tokens:,} | {r.wall_s:.2f} | {rate:,.0f} | "
                          f"{r.events_per_request():.0f} | {cpu} |")
    failures = []
    for m in results.levels:
        if m.run.failures:
            distinct = sorted(set(m.run.failures))[:3]
            failures.append(f"- {m.path} at {m.concurrency}: {len(m.run.failures)} failed, e.g. "
                            + "; ".join(f"`{d}`" for d in distinct))
    for relay in results.relays:
        if relay.run.failures:
            failures.append(f"- relay {relay.path}: {len(relay.run.failures)} failed, e.g. "
                            f"`{relay.run.failures[0]}`")

    one_c, one_b = find(results, "cortex", 1), find(results, "bus", 1)
    t1 = added(one_c, one_b).ttft_p50 if one_c and one_b else None
    mid_c, mid_b = find(results, "cortex", 64), find(results, "bus", 64)
    t2_rate = mid_c.run.rate if mid_c else None
    t2_p99 = added(mid_c, mid_b).ttft_p99 if mid_c and mid_b else None
    t2_ok = None if t2_rate is None or t2_p99 is None else t2_rate >= 500 and t2_p99 <= 50
    relay_text, t3_ok = relay_target(results)
    growth = (results.gateway_rss_end - results.gateway_rss_first) / MIB
    targets = [
        f"- **{verdict(None if t1 is None else t1 <= 1.0)}** added TTFT p50 ≤ 1 ms at 1 stream: "
        + (f"{t1:+.2f} ms" if t1 is not None else "not measured"),
        f"- **{verdict(t2_ok)}**"
        " ≥ 500 streamed requests/s at 64 streams with added TTFT p99 ≤ 50 ms: "
        + (f"{t2_rate:.0f} req/s, added TTFT p99 {t2_p99:+.2f} ms"
           if t2_rate is not None and t2_p99 is not None else "not measured"),
        f"- **{verdict(t3_ok)}** ≥ 100k tokens/s relayed by one gateway: {relay_text}",
        f"- **{verdict(growth <= 20)}** gateway RSS flat (after − before ≤ 20 MiB): "
        f"{results.gateway_rss_first / MIB:.1f} → {results.gateway_rss_end / MIB:.1f} MiB "
        f"({growth:+.1f} MiB); before = VmRSS after the first warm-up (1 stream), after = at the "
        f"end of every level and the relay run (idle right after start: "
        f"{results.gateway_rss_idle / MIB:.1f} MiB)",
    ]
    failure_text = "\n## Failures\n\n" + "\n".join(failures) + "\n" if failures else ""
    litellm_rss = ""
    if results.litellm_rss_end:
        litellm_rss = (f"\nLiteLLM proxy RSS: {results.litellm_rss_idle / MIB:.0f} MiB idle after "
                       f"start → {results.litellm_rss_end / MIB:.0f} MiB at the end.\n")
    levels_text = ", ".join(f"{n} requests at {c} stream{'s' if c > 1 else ''}"
                            for c, n in plan.levels)
    return f"""# Gateway overhead: Cortex over the bus floor, LiteLLM over its upstream

- date: {started.strftime("%Y-%m-%d %H:%M UTC")}
- machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}
- load average before / after: {load_before} / {load_average()} (other work on the machine
  shows here)
- code: {git_revision()}
- command: `{shlex.join([".venv/bin/python", "bench/gateway.py", *sys.argv[1:]])}`
- plan: {levels_text}
- closed loop, no request starts after {plan.limit_s:.0f} s per path and level, each level after a
  warm-up of max(20, streams) requests; relay: {RELAY_STREAMS} streams × {RELAY_TOKENS} tokens ×
  {plan.relay_rounds} round(s)
- LiteLLM: {litellm_note}

Every process is separate and shares the same {os.cpu_count()} cores with this client:
nats-server (`EmbeddedNatsServer`), the instant neuron (`bench/instant_neuron.py`: the real
`Worker`, an engine that yields {TOKENS} one-word tokens without computing, default chunk
coalescing, max_jobs and max_waiting 1024), `cortex serve --log-level warning`, and for the
reference LiteLLM's proxy (`--num_workers 1`, `LITELLM_LOG=ERROR`, no master key as the Cortex
gateway here runs without API keys, no
database, its venv's defaults, uvloop included; Cortex runs on plain asyncio) in front of
`bench/instant_upstream.py` (raw ASGI on uvicorn; one SSE event per token, all at once).

## Streamed requests, {TOKENS} tokens each

TTFT: request sent → first content (an SSE `delta.content`, or a `TokenChunk` with text on the
bus); total: → end of stream. Times in ms. bus = `JobRequest` published straight on the bus (one
connection, one wildcard inbox, as the gateway does); upstream = the instant upstream called
directly. Proxy CPU = utime + stime of the proxy's process group over the measured requests
(/proc/<pid>/stat), divided by the requests; RSS = VmRSS before → after the level; client CPU =
this process (getrusage), which parses every event: it competes for the same cores. The HTTP
client is a minimal HTTP/1.1 keep-alive client on asyncio streams (bench/loadgen.py), one
connection per stream in flight: httpx spent 3.3 ms of client CPU per request at 1 stream and
12 ms at 64, which capped every HTTP path below 100 requests/s.

{LEVEL_HEADER}
{chr(10).join(rows)}
{litellm_rss}
## Added by the proxy

Proxy minus its floor at the same percentile and concurrency (ms); last column: req/s through
the proxy / on the floor.

| streams | proxy − floor | TTFT p50 | TTFT p99 | total p50 | total p99 | req/s |
|---|---|---|---|---|---|---|
{chr(10).join(added_rows)}

## Relay throughput

{RELAY_STREAMS} concurrent streams of {RELAY_TOKENS} tokens (coalesced chunks, as the neuron
sends them), tokens counted from `usage.completion_tokens` (`JobFinished` on the bus,
`stream_options.include_usage` through the gateway).

| path | streams | tokens | wall s | tokens/s | content events/stream | gateway CPU |
|---|---|---|---|---|---|---|
{chr(10).join(relay_rows)}

## Targets

{chr(10).join(targets)}
{failure_text}"""


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


# --------------------------------------------------------------------------- main


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


async def run_all(plan: Plan, nats_url: str, gateway: tuple[Child, str],
                  litellm: tuple[Child, str, str] | None, results: Results) -> None:
    bus = BusClient(nats_url, MODEL, root=SUBJECT_ROOT, timeout_s=REQUEST_TIMEOUT_S)
    await bus.start()
    try:
        await measure(plan, bus, gateway, litellm, results)
    finally:
        await bus.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="far fewer requests (a smoke run)")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM reference")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gateway.md")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _terminate)
    started = datetime.now(UTC)
    load_before = load_average()
    results = Results()
    litellm_note = "not measured"
    children: list[Child] = []
    nats_server = EmbeddedNatsServer(port=None)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        logs = Path(tmp)
        try:
            nats_url = nats_server.start().url
            children.append(start_neuron(nats_url, logs))
            gw_child, gw_base = start_gateway(nats_url, logs)
            children.append(gw_child)
            litellm: tuple[Child, str, str] | None = None
            version = None if args.no_litellm else litellm_version()
            if args.no_litellm:
                litellm_note = "not measured (--no-litellm)"
            elif version is None:
                litellm_note = (f"not measured: no LiteLLM in {BENCH_VENV} (python3.11 -m venv "
                                ".bench-venv && .bench-venv/bin/pip install "
                                "'litellm[proxy]==1.106.2')")
            else:
                up_child, up_base = start_upstream(logs)
                children.append(up_child)
                try:
                    ll_child, ll_base = start_litellm(up_base, logs)
                except SetupError as exc:
                    print(exc, file=sys.stderr)
                    last = [line for line in str(exc).splitlines() if line.strip()][-1:]
                    litellm_note = f"not measured: the proxy did not start ({' '.join(last)})"
                    up_child.stop()
                else:
                    children.append(ll_child)
                    litellm = (ll_child, ll_base, up_base)
                    litellm_note = f"{version}, same run"
            asyncio.run(run_all(plan, nats_url, (gw_child, gw_base), litellm, results))
        except SetupError as exc:
            sys.exit(f"bench/gateway.py: {exc}")
        finally:
            for child in reversed(children):
                child.stop()
            nats_server.stop()
    text = report(args, plan, results, litellm_note, started, load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("bench/gateway.py: interrupted; every process it started is stopped")
