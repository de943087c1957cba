"""The one relay: a job's event stream as typed, dialect-neutral outcomes.

`relay` turns the events after `JobAccepted` into `Outcome`s — text, reasoning and tool-call
deltas, keep-alives, and exactly one terminal `Finished` or `Failed` — in batches of what arrived
together (one write to the client each), and never raises (except the `CancelledError` of a
client that went away). When the neuron dies, freezes or goes silent mid-stream, the relay
continues the job on another replica (`cortex.failover`) and the client sees one uninterrupted
stream. On the way out, however it ends, it cancels the job on its neuron if the job is still
running and stops routing the job's inbox.

`collect` is the same relay folded into one `Completion`, for non-streaming answers; it stops the
job if the HTTP client disconnects first. Dialects only render outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, assert_never

from bus_schema.messages import JobAccepted, JobEvent, JobFailed, JobFinished, TokenChunk
from cortex.bus import BusError, ClientTooSlowError, JobStream, Keepalive
from cortex.errors import ApiError, Reason, from_job_failure
from cortex.failover import Failover

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One complete tool call (the neuron parses a call whole before sending it)."""

    index: int
    id: str
    name: str
    arguments: str
    """JSON text of the arguments object."""


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    error: ApiError


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """The stream was silent for a keep-alive interval (dialects send a comment or a ping)."""


Delta = TextDelta | ReasoningDelta | ToolCallDelta
Outcome = TextDelta | ReasoningDelta | ToolCallDelta | Finished | Failed | KeepAlive

_KEEPALIVE = KeepAlive()


def _stream_broken(exc: BusError) -> ApiError:
    if isinstance(exc, ClientTooSlowError):  # logged by the stream when it gave up
        return ApiError(Reason.STREAM_BROKEN, str(exc))
    return ApiError(Reason.STREAM_BROKEN, f"the stream from the neuron broke: {exc}")


#: What `relay` yields: the outcomes of the events that arrived together, to be written at once.
Batch = list[Outcome]


def _outcomes(
    event: JobEvent, stream: JobStream, accepted: JobAccepted, tool_calls: int
) -> tuple[list[Outcome], int, bool]:
    """One event's outcomes, the running tool-call count, and whether it was terminal."""
    out: list[Outcome] = []
    match event:
        case TokenChunk():
            if event.reasoning:
                out.append(ReasoningDelta(event.reasoning))
            if event.text:
                out.append(TextDelta(event.text))
            for call in event.tool_calls:
                tool_calls += 1
                out.append(ToolCallDelta(call.index, call.id, call.name, call.arguments))
            return out, tool_calls, False
        case JobFinished(finish_reason="cancelled"):
            out.append(Failed(ApiError(Reason.CANCELLED,
                                       f"the job was cancelled on neuron '{stream.node}'")))
        case JobFinished(usage=usage):
            reason: FinishReason = (
                "tool_calls" if tool_calls and event.finish_reason == "stop"
                else "length" if event.finish_reason == "length" else "stop"
            )
            out.append(Finished(reason, accepted.prompt_tokens, usage.completion_tokens,
                                event.stop_sequence))
        case JobFailed():
            out.append(Failed(from_job_failure(event)))
        case JobAccepted():
            out.append(Failed(ApiError(Reason.BAD_REPLY, "the neuron accepted the job twice")))
        case _:
            assert_never(event)
    return out, tool_calls, True


async def relay(stream: JobStream, accepted: JobAccepted) -> AsyncGenerator[Batch, None]:
    """Outcomes of an accepted job, in batches; the last batch ends with exactly one `Finished`
    or `Failed`. A stream that breaks off continues on another replica where it can."""
    tool_calls = 0
    failover = Failover(stream, accepted)
    ended = False  # the terminal outcome was handed out
    try:
        while True:
            try:
                async for events in stream.events():
                    if isinstance(events, Keepalive):
                        yield [_KEEPALIVE]
                        continue
                    batch: Batch = []
                    for event in events:
                        outcomes, tool_calls, ended = _outcomes(event, stream, accepted,
                                                                tool_calls)
                        if isinstance(event, TokenChunk):
                            failover.delivered(event)
                        batch.extend(outcomes)
                        if ended:
                            yield batch
                            return
                    if batch:
                        yield batch
                ended = True
                yield [Failed(_stream_broken(BusError("stream ended without a terminal event")))]
                return
            except BusError as exc:
                if not failover.can_resume(exc):
                    if not isinstance(exc, ClientTooSlowError):
                        log.warning("job=%s stream broke: %s", stream.job.job_id, exc)
                    ended = True
                    yield [Failed(_stream_broken(exc))]
                    return
                try:
                    stream, _ = await failover.resume(stream, exc)
                except ApiError as error:
                    ended = True
                    yield [Failed(error)]
                    return
    finally:
        if not ended:
            log.info("job=%s client went away; cancelling on %s", stream.job.job_id, stream.node)
        await stream.release()


@dataclass(frozen=True)
class Completion:
    """A whole generation, folded from its outcomes."""

    text: str
    reasoning: str
    tool_calls: tuple[ToolCallDelta, ...]
    finished: Finished


async def fold(batches: AsyncGenerator[Batch, None]) -> Completion:
    """Fold a relay into a `Completion`.

    Raises:
        ApiError: the job failed.
    """
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCallDelta] = []
    async for batch in batches:
        for outcome in batch:
            match outcome:
                case TextDelta(text=piece):
                    text.append(piece)
                case ReasoningDelta(text=piece):
                    reasoning.append(piece)
                case ToolCallDelta():
                    calls.append(outcome)
                case Finished():
                    return Completion("".join(text), "".join(reasoning), tuple(calls), outcome)
                case Failed(error=error):
                    raise error
                case KeepAlive():
                    pass
                case _:
                    assert_never(outcome)
    raise _stream_broken(BusError("the relay ended without a terminal outcome"))


async def collect(
    stream: JobStream, accepted: JobAccepted, disconnected: Callable[[], Awaitable[None]]
) -> Completion:
    """`fold(relay(...))`, but stop the job on the neuron if ``disconnected`` returns first.

    Raises:
        ApiError: the job failed.
        asyncio.CancelledError: the client went away.
    """
    outcomes = relay(stream, accepted)
    folding = asyncio.ensure_future(fold(outcomes))
    watching = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({folding, watching}, return_when=asyncio.FIRST_COMPLETED)
        if not folding.done():
            folding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await folding
            raise asyncio.CancelledError  # nobody is listening any more
        return folding.result()
    finally:
        watching.cancel()
        await outcomes.aclose()  # runs the relay's cleanup (cancel on the neuron, inbox)
