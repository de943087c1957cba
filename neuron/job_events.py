"""The one writer of a job's event stream (DESIGN.md "The bus protocol"): it numbers events
(``seq`` 0 for the first, then contiguous), sends at most one `JobAccepted`, and exactly one
terminal event — `JobFinished` or `JobFailed` — after which it sends nothing more.

Whoever runs a job writes through a `JobEvents`; a failure anywhere can then always be reported
to the waiting gateway (`fail` is a no-op once the stream has ended), so no job ends in silence.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from bus_schema.errors import ErrorCode
from bus_schema.messages import (
    FinishReason,
    JobAccepted,
    JobEvent,
    JobFailed,
    JobFinished,
    Timings,
    TokenChunk,
    Usage,
)

log = logging.getLogger(__name__)

Publish = Callable[[JobEvent], Awaitable[None]]


class ChunkSource(Protocol):
    """Output collected for the next chunk (see `neuron.runner`)."""

    def take(self, seq: int) -> TokenChunk | None:
        """The chunk with number ``seq``, or None when nothing is pending."""
        ...


class JobEvents:
    """A job's stream: accepted → chunks → one terminal event."""

    def __init__(self, job_id: str, publish: Publish) -> None:
        self.job_id = job_id
        self._publish = publish
        self._seq = -1
        self.accepted = False
        self.ended = False

    async def _send(self, event: JobEvent) -> None:
        await self._publish(event)

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    async def accept(self, *, node: str, model: str, prompt_tokens: int, max_tokens: int,
                     resumed_tokens: int = 0) -> None:
        if self.accepted or self.ended:
            raise RuntimeError(f"job {self.job_id}: accepted twice or after its end")
        self.accepted = True
        await self._send(JobAccepted(job_id=self.job_id, seq=self._next(), node=node,
                                     model=model, prompt_tokens=prompt_tokens,
                                     max_tokens=max_tokens, resumed_tokens=resumed_tokens))

    async def chunk(self, source: ChunkSource) -> None:
        """Send what ``source`` has collected, if anything."""
        if self.ended:
            return
        chunk = source.take(self._seq + 1)
        if chunk is not None:
            self._next()
            await self._send(chunk)

    async def finish(self, *, reason: FinishReason, usage: Usage, stop_sequence: str | None,
                     timings: Timings) -> None:
        if self.ended:
            log.warning("job=%s already ended; finish dropped", self.job_id)
            return
        self.ended = True
        await self._send(JobFinished(job_id=self.job_id, seq=self._next(), finish_reason=reason,
                                     usage=usage, stop_sequence=stop_sequence, timings=timings))

    async def fail(self, code: ErrorCode, message: str, *, retryable: bool = False,
                   prompt_tokens: int | None = None, max_prompt_tokens: int | None = None) -> None:
        """End the stream with a failure (before acceptance: ``seq`` 0, so the gateway can still
        answer with an HTTP status). A no-op once the stream has ended."""
        if self.ended:
            return
        self.ended = True
        await self._send(JobFailed(job_id=self.job_id, seq=self._next(), code=code,
                                   message=message, retryable=retryable,
                                   prompt_tokens=prompt_tokens,
                                   max_prompt_tokens=max_prompt_tokens))
