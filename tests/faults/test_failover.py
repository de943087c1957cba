"""Failover with real neuron processes: two neurons serve the same tiny random-weight model; the
one serving a greedy generation is killed (SIGKILL) or frozen (SIGSTOP) mid-stream. The gateway
notices within a few seconds, resumes the generation on the other neuron from the tokens already
delivered, and the client — the real OpenAI or Anthropic SDK — sees one well-formed stream whose
text equals an uninterrupted greedy run's. With no other replica the stream ends with an error
event instead, within a bounded time.

Each test logs what it measured (``-o log_cli=true --log-cli-level=WARNING`` shows it): the gap
the client saw, and from the gateway's log the detection time (last event of the dead attempt to
the failover's decision) and the time to start the continuation. The only timed assertions are
generous bounds on detection (the issue asks for 3 s; these allow 5 s).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import anthropic
import openai
import pytest
from anthropic.types import (
    MessageParam,
    RawContentBlockDeltaEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    TextDelta,
    ThinkingDelta,
)
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from cortex.embedded_nats import EmbeddedNatsServer
from tests.faults.cluster import FaultFleet
from tests.support.tiny_models import build_tiny_llama

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(240)]
log = logging.getLogger(__name__)

SHARED = "tiny/shared"
"""Served by both neurons."""
SOLO = "tiny/solo"
"""Served by ``na`` only."""
MAX_TOKENS = 900
CONTENT = "Tell me a long story about the capital of France."
OPENAI_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": CONTENT}]
ANTHROPIC_MESSAGES: list[MessageParam] = [{"role": "user", "content": CONTENT}]
#: Client-side events received before the fault is injected.
EVENTS_BEFORE_FAULT = 40
#: The issue asks for detection within 3 s of the last event; this bound leaves room for a
#: loaded test machine (the measured figures are logged).
DETECTION_BOUND_S = 5.0


@pytest.fixture(scope="module")
def fleet(nats_server: EmbeddedNatsServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[FaultFleet]:
    model = build_tiny_llama(tmp_path_factory.mktemp("long-tiny"), context_length=2048)
    folder = str(model.folder)
    with FaultFleet(nats_url=nats_server.url, root=f"faults-{uuid.uuid4().hex[:8]}",
                    log_dir=tmp_path_factory.mktemp("neuron-logs")) as running:
        running.add("na", [(folder, SHARED), (folder, SOLO)])
        running.add("nb", [(folder, SHARED)])
        running.wait_ready()
        yield running


@pytest.fixture
def cluster(fleet: FaultFleet, caplog: pytest.LogCaptureFixture) -> FaultFleet:
    """Both neurons up and idle; the gateway's failover log captured."""
    fleet.revive()
    caplog.set_level(logging.INFO, logger="cortex.failover")
    return fleet


# ------------------------------------------------------------------ streams as the client saw them


@dataclass
class Seen:
    """One streamed answer: its text and reasoning, ids, terminal details and when each event
    arrived."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    times: list[float] = field(default_factory=list)
    error: str | None = None
    events: list[str] = field(default_factory=list)
    """Anthropic event types in order."""

    @property
    def joined(self) -> str:
        return "".join(self.text)

    @property
    def thought(self) -> str:
        return "".join(self.reasoning)

    def blocks(self) -> list[str]:
        """The Anthropic event types with runs of deltas merged: the stream's structure."""
        return [t for i, t in enumerate(self.events) if i == 0 or t != self.events[i - 1]]

    def largest_gap(self) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:], strict=False)), default=0.0)


def _openai_stream(client: openai.OpenAI, model: str, *, seen: Seen,
                   at_event: tuple[int, threading.Event] | None = None) -> None:
    stream = client.chat.completions.create(
        model=model, messages=OPENAI_MESSAGES, temperature=0, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True})
    try:
        for chunk in stream:
            _take_openai(chunk, seen)
            if at_event is not None and len(seen.times) == at_event[0]:
                at_event[1].set()
    except openai.APIError as exc:
        seen.times.append(time.monotonic())
        seen.error = exc.message


def _take_openai(chunk: ChatCompletionChunk, seen: Seen) -> None:
    seen.times.append(time.monotonic())
    seen.ids.add(chunk.id)
    for choice in chunk.choices:
        if choice.delta.content:
            seen.text.append(choice.delta.content)
        reasoning = (choice.delta.model_extra or {}).get("reasoning_content")
        if reasoning:
            seen.reasoning.append(reasoning)
        if choice.finish_reason is not None:
            seen.finish_reasons.append(choice.finish_reason)
    if chunk.usage is not None:
        assert seen.completion_tokens is None, "usage sent twice"
        seen.prompt_tokens = chunk.usage.prompt_tokens
        seen.completion_tokens = chunk.usage.completion_tokens


def _anthropic_stream(client: anthropic.Anthropic, model: str, *, seen: Seen,
                      at_event: tuple[int, threading.Event] | None = None) -> None:
    """Greedy, with thinking blocks (the tiny model may well open a reasoning block). This SDK
    sends an ``anthropic-version`` under which sampling parameters are ignored (REFERENCE §8.1),
    so the request names an older one."""
    try:
        with client.messages.create(model=model, max_tokens=MAX_TOKENS, stream=True,
                                    messages=ANTHROPIC_MESSAGES,
                                    thinking={"type": "enabled", "budget_tokens": MAX_TOKENS - 1},
                                    extra_headers={"anthropic-version": "2023-06-01"},
                                    extra_body={"temperature": 0}) as stream:
            for event in stream:
                seen.times.append(time.monotonic())
                seen.events.append(event.type)
                if isinstance(event, RawMessageStartEvent):
                    seen.ids.add(event.message.id)
                    seen.prompt_tokens = event.message.usage.input_tokens
                elif isinstance(event, RawContentBlockDeltaEvent):
                    if isinstance(event.delta, TextDelta):
                        seen.text.append(event.delta.text)
                    elif isinstance(event.delta, ThinkingDelta):
                        seen.reasoning.append(event.delta.thinking)
                elif isinstance(event, RawMessageDeltaEvent):
                    if event.delta.stop_reason is not None:
                        seen.finish_reasons.append(event.delta.stop_reason)
                    seen.completion_tokens = event.usage.output_tokens
                if at_event is not None and len(seen.times) == at_event[0]:
                    at_event[1].set()
    except anthropic.APIError as exc:
        seen.times.append(time.monotonic())
        seen.error = exc.message


@pytest.fixture(scope="module")
def openai_reference(fleet: FaultFleet) -> Seen:
    """An uninterrupted greedy run of the request the OpenAI tests make."""
    fleet.revive()
    seen = Seen()
    with fleet.stack.openai_client() as client:
        _openai_stream(client, SHARED, seen=seen)
    assert seen.error is None and seen.finish_reasons == ["length"]
    assert seen.completion_tokens == MAX_TOKENS
    assert len(seen.times) > 2 * EVENTS_BEFORE_FAULT  # the faults strike mid-stream
    return seen


@pytest.fixture(scope="module")
def anthropic_reference(fleet: FaultFleet) -> Seen:
    fleet.revive()
    seen = Seen()
    with fleet.stack.anthropic_client() as client:
        _anthropic_stream(client, SHARED, seen=seen)
    assert seen.error is None and seen.finish_reasons == ["max_tokens"]
    assert len(seen.times) > 2 * EVENTS_BEFORE_FAULT  # the faults strike mid-stream
    return seen


# ------------------------------------------------------------------ measuring from the gateway log


def _failover_times(caplog: pytest.LogCaptureFixture, seen: Seen) -> tuple[float, float]:
    """(detection, continuation start) in seconds: from the last event the client got before
    the failover decided to resume (or to give up) to that decision, and from it to the
    continuation's acceptance (0 when it gave up)."""
    decided = next(r for r in caplog.records if r.name == "cortex.failover"
                   and ("resuming after" in r.getMessage() or "not resumed" in r.getMessage()))
    # Log records carry wall-clock time; the client's events monotonic time.
    offset = time.time() - time.monotonic()
    decided_at = decided.created - offset
    before = max(t for t in seen.times if t <= decided_at)
    accepted = [r for r in caplog.records if "resumed on" in r.getMessage()]
    start = accepted[0].created - decided.created if accepted else 0.0
    return decided_at - before, start


def _resumed_on(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(" resumed on ")[1].split()[0]
            for r in caplog.records if " resumed on " in r.getMessage()]


T = TypeVar("T")


def _through_fault(stream: Callable[[tuple[int, threading.Event]], object],
                   strike: Callable[[], T], *, join_s: float = 120.0) -> T:
    """Run ``stream`` in a thread, telling it to set an event at its `EVENTS_BEFORE_FAULT`-th
    event; once it is that far, ``strike`` (what it returns is returned); then wait for the
    stream to end (a hang fails)."""
    fault = threading.Event()
    thread = threading.Thread(target=lambda: stream((EVENTS_BEFORE_FAULT, fault)), daemon=True)
    thread.start()
    assert fault.wait(120), "the stream did not start"
    struck = strike()
    thread.join(join_s)
    assert not thread.is_alive(), "the stream never ended"
    return struck


def _kill_serving(cluster: FaultFleet) -> str:
    """SIGKILL the neuron serving the one job in flight; its name."""
    [victim] = cluster.serving()
    cluster.neurons[victim].kill()
    return victim


# ------------------------------------------------------------------ resumed on the other replica


def test_openai_stream_resumes_on_the_other_replica_after_sigkill(
    cluster: FaultFleet, openai_reference: Seen, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    with cluster.stack.openai_client() as client:
        victim = _through_fault(
            lambda at: _openai_stream(client, SHARED, seen=seen, at_event=at),
            lambda: _kill_serving(cluster))
    assert seen.error is None
    assert len(seen.ids) == 1
    assert (seen.joined, seen.thought) == (openai_reference.joined, openai_reference.thought)
    assert seen.finish_reasons == ["length"]
    assert (seen.prompt_tokens, seen.completion_tokens) == (
        openai_reference.prompt_tokens, openai_reference.completion_tokens)
    assert _resumed_on(caplog) == [n for n in cluster.neurons if n != victim]
    detection, start = _failover_times(caplog, seen)
    log.warning("SIGKILL, OpenAI stream: 1 attempted, 1 resumed, 0 failed, 0 lost; detection "
                "%.2fs, continuation accepted %.2fs later, largest gap the client saw %.2fs",
                detection, start, seen.largest_gap())
    assert detection < DETECTION_BOUND_S


def test_anthropic_stream_resumes_on_the_other_replica_after_sigkill(
    cluster: FaultFleet, anthropic_reference: Seen, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    with cluster.stack.anthropic_client() as client:
        victim = _through_fault(
            lambda at: _anthropic_stream(client, SHARED, seen=seen, at_event=at),
            lambda: _kill_serving(cluster))
    assert seen.error is None
    assert seen.events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert seen.blocks() == anthropic_reference.blocks()  # same blocks, one start, one stop
    assert (seen.joined, seen.thought) == (anthropic_reference.joined,
                                           anthropic_reference.thought)
    assert seen.finish_reasons == ["max_tokens"]
    assert seen.completion_tokens == anthropic_reference.completion_tokens == MAX_TOKENS
    assert _resumed_on(caplog) == [n for n in cluster.neurons if n != victim]
    detection, start = _failover_times(caplog, seen)
    log.warning("SIGKILL, Anthropic stream: 1 attempted, 1 resumed, 0 failed, 0 lost; "
                "detection %.2fs, continuation accepted %.2fs later, largest gap %.2fs",
                detection, start, seen.largest_gap())
    assert detection < DETECTION_BOUND_S


def test_a_frozen_neuron_is_resumed_from_and_its_late_events_are_ignored(
    cluster: FaultFleet, openai_reference: Seen, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()

    def freeze_until_resumed() -> str:
        [victim] = cluster.serving()
        frozen = cluster.neurons[victim]
        frozen.freeze()
        deadline = time.monotonic() + 30
        while not _resumed_on(caplog):  # the continuation runs elsewhere: wake the frozen one
            assert time.monotonic() < deadline, "not resumed"
            time.sleep(0.02)
        frozen.thaw()
        return victim

    with cluster.stack.openai_client() as client:
        victim = _through_fault(
            lambda at: _openai_stream(client, SHARED, seen=seen, at_event=at),
            freeze_until_resumed)
    frozen = cluster.neurons[victim]
    assert seen.error is None and len(seen.ids) == 1
    assert (seen.joined, seen.thought) == (openai_reference.joined, openai_reference.thought)
    assert seen.finish_reasons == ["length"]
    assert seen.completion_tokens == openai_reference.completion_tokens
    # The thawed neuron got the gateway's cancel and ended its job; what it sent after waking
    # up went to the abandoned attempt's inbox and never reached the client (the text above).
    job_id = next(iter(seen.ids)).removeprefix("chatcmpl-")
    cluster.wait_idle([victim])
    assert f"job={job_id} finished model={SHARED} reason=cancelled" in frozen.log()
    detection, start = _failover_times(caplog, seen)
    log.warning("SIGSTOP, OpenAI stream: 1 attempted, 1 resumed, 0 failed, 0 lost; detection "
                "%.2fs, continuation accepted %.2fs later, largest gap %.2fs",
                detection, start, seen.largest_gap())
    assert detection < DETECTION_BOUND_S


def test_a_non_streaming_request_is_resumed(
    cluster: FaultFleet, openai_reference: Seen, caplog: pytest.LogCaptureFixture
) -> None:
    replies: list[ChatCompletion] = []
    with cluster.stack.openai_client() as client:
        thread = threading.Thread(target=lambda: replies.append(client.chat.completions.create(
            model=SHARED, messages=OPENAI_MESSAGES, temperature=0, max_tokens=MAX_TOKENS)),
            daemon=True)
        thread.start()
        [victim] = cluster.serving(timeout_s=60)
        time.sleep(0.2)  # some tokens in (the whole answer takes seconds)
        cluster.neurons[victim].kill()
        thread.join(120)
    assert not thread.is_alive() and len(replies) == 1
    [reply] = replies
    message = reply.choices[0].message
    assert (message.content or "", (message.model_extra or {}).get("reasoning_content") or "") == (
        openai_reference.joined, openai_reference.thought)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == openai_reference.completion_tokens
    assert _resumed_on(caplog) == [n for n in cluster.neurons if n != victim]
    log.warning("SIGKILL, OpenAI non-streaming: 1 attempted, 1 resumed, 0 failed, 0 lost")


def test_concurrent_streams_on_a_killed_neuron_all_resume(
    cluster: FaultFleet, openai_reference: Seen, caplog: pytest.LogCaptureFixture
) -> None:
    streams = 4
    seen = [Seen() for _ in range(streams)]
    started = [threading.Event() for _ in range(streams)]
    with cluster.stack.openai_client() as client:
        threads = [threading.Thread(
            target=lambda s=s, e=e: _openai_stream(client, SHARED, seen=s,
                                                   at_event=(EVENTS_BEFORE_FAULT, e)),
            daemon=True) for s, e in zip(seen, started, strict=True)]
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(120)
        load = {name: cluster.running(name) for name in cluster.neurons}
        victim = max(load, key=lambda name: load[name])
        cluster.neurons[victim].kill()
        for thread in threads:
            thread.join(180)
    assert not any(thread.is_alive() for thread in threads), "a request was lost"
    ok = [s for s in seen if s.error is None and s.joined == openai_reference.joined
          and s.thought == openai_reference.thought
          and s.finish_reasons == ["length"]
          and s.completion_tokens == openai_reference.completion_tokens]
    failed = [s.error for s in seen if s.error is not None]
    resumed = _resumed_on(caplog)
    log.warning("SIGKILL, %d concurrent OpenAI streams (%s running on %s): %d attempted, "
                "%d succeeded (%d of them resumed), %d failed cleanly, %d lost; largest gaps %s",
                streams, load[victim], victim, streams, len(ok), len(resumed), len(failed),
                streams - len(ok) - len(failed),
                ", ".join(f"{s.largest_gap():.2f}s" for s in seen))
    assert not failed
    assert len(ok) == streams
    assert len(resumed) == load[victim]


# ------------------------------------------------------------------ nowhere to resume


def test_openai_stream_without_another_replica_ends_with_an_error_event(
    cluster: FaultFleet, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    with cluster.stack.openai_client() as client:
        _through_fault(lambda at: _openai_stream(client, SOLO, seen=seen, at_event=at),
                       cluster.neurons["na"].freeze, join_s=60)
    assert seen.error is not None
    assert "stopped heartbeating" in seen.error
    assert "could not be resumed" in seen.error
    assert seen.finish_reasons == []
    detection, _ = _failover_times(caplog, seen)
    waited = seen.times[-1] - seen.times[-2]
    log.warning("no replica, OpenAI stream: 1 attempted, 0 succeeded, 1 failed cleanly, 0 lost; "
                "detection %.2fs, error event %.2fs after the last token", detection, waited)
    assert waited < DETECTION_BOUND_S


def test_anthropic_stream_without_another_replica_ends_with_an_error_event(
    cluster: FaultFleet, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    with cluster.stack.anthropic_client() as client:
        _through_fault(lambda at: _anthropic_stream(client, SOLO, seen=seen, at_event=at),
                       cluster.neurons["na"].freeze, join_s=60)
    assert seen.error is not None
    assert "stopped heartbeating" in seen.error
    assert seen.finish_reasons == []
    waited = seen.times[-1] - seen.times[-2]
    detection, _ = _failover_times(caplog, seen)
    log.warning("no replica, Anthropic stream: 1 attempted, 0 succeeded, 1 failed cleanly, "
                "0 lost; detection %.2fs, error event %.2fs after the last token", detection,
                waited)
    assert waited < DETECTION_BOUND_S
