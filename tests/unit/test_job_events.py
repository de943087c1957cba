"""The job event writer: contiguous ``seq``, one acceptance, exactly one terminal event."""

from __future__ import annotations

import pytest

from bus_schema.errors import ErrorCode
from bus_schema.messages import JobEvent, JobFailed, JobFinished, Timings, TokenChunk, Usage
from neuron.job_events import JobEvents


class _Pending:
    def __init__(self, texts: list[str]) -> None:
        self._texts = texts

    def take(self, seq: int) -> TokenChunk | None:
        return TokenChunk(job_id="j", seq=seq, text=self._texts.pop(0)) if self._texts else None


async def test_events_are_numbered_and_end_once() -> None:
    sent: list[JobEvent] = []

    async def publish(event: JobEvent) -> None:
        sent.append(event)

    events = JobEvents("j", publish)
    await events.accept(node="n", model="m", prompt_tokens=3, max_tokens=5)
    pending = _Pending(["a", "b"])
    await events.chunk(pending)
    await events.chunk(pending)
    await events.chunk(pending)  # nothing pending: nothing sent, no seq used
    await events.finish(reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2),
                        stop_sequence=None, timings=Timings())
    await events.fail(ErrorCode.ENGINE_ERROR, "late")  # after the end: dropped
    await events.chunk(_Pending(["c"]))
    assert [e.seq for e in sent] == [0, 1, 2, 3]
    assert isinstance(sent[-1], JobFinished)


async def test_a_failure_before_acceptance_is_seq_zero() -> None:
    sent: list[JobEvent] = []

    async def publish(event: JobEvent) -> None:
        sent.append(event)

    events = JobEvents("j", publish)
    await events.fail(ErrorCode.OVERLOADED, "busy", retryable=True)
    assert len(sent) == 1 and isinstance(sent[0], JobFailed) and sent[0].seq == 0
    with pytest.raises(RuntimeError):
        await events.accept(node="n", model="m", prompt_tokens=1, max_tokens=1)
