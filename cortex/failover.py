"""Failover: a job whose neuron died, froze or went silent mid-stream continues on another replica.

The relay (`cortex.relay`) records the token ids of every chunk its client was sent (bounded by the
job's completion budget and `MAX_RESUME_TOKENS`). When the stream breaks off — its node stopped
heartbeating (`cortex.bus.NodeGoneError`) or it was silent past the idle timeout — `Failover.resume`
gives the old attempt up (cancel on its node, stop routing its inbox: late events of that attempt
are dropped) and starts a continuation through the one start path (`cortex.routing.start_job`),
excluding every node that failed the job. The continuation is the same request under a fresh job id
(``<job id>-r<n>``) with `ResumeState`: the new neuron continues right after the delivered tokens,
with the same held-back text and output mode (`neuron.resume`), and reports usage for the whole
generation. The client sees one stream in its dialect; only the failure to continue is an error.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import msgspec

from bus_schema.messages import (
    MAX_RESUME_TOKENS,
    JobAccepted,
    JobRequest,
    ResumeState,
    TokenChunk,
)
from cortex.bus import BusError, JobStream, StreamTimeoutError
from cortex.errors import ApiError, Reason
from cortex.routing import start_job

log = logging.getLogger(__name__)

#: Continuations one job may start (each after a failure of the one before).
MAX_RESUMES: Final = 2


class Failover:
    """One job's failover state: what its client received, who failed it, resumes left."""

    def __init__(self, stream: JobStream, accepted: JobAccepted) -> None:
        self._job = stream.job
        self._bus = stream.bus
        self._limit = min(accepted.max_tokens, MAX_RESUME_TOKENS)
        self._ids: list[int] = []
        self._too_long = False
        self._failed: set[str] = {accepted.node}
        self.resumes = 0
        """Continuations started so far."""

    def delivered(self, chunk: TokenChunk) -> None:
        """``chunk`` is being sent to the client: its tokens are part of the answer."""
        if self._too_long or not chunk.token_ids:
            return
        if len(self._ids) + len(chunk.token_ids) > self._limit:
            self._too_long = True  # more tokens than the budget: do not resume from this
            self._ids = []
            return
        self._ids.extend(chunk.token_ids)

    @staticmethod
    def can_resume(cause: BusError) -> bool:
        """Whether ``cause`` is a failure another replica may continue from: the node went
        silent (gone or idle). A protocol error is a bug to surface, not to paper over."""
        return isinstance(cause, StreamTimeoutError)

    async def resume(self, dead: JobStream, cause: BusError) -> tuple[JobStream, JobAccepted]:
        """Give ``dead`` up and continue its job on another replica.

        Raises:
            ApiError: it cannot continue (no other healthy replica, too many resumes, a
                generation too long, or the continuation failed to start); the message says why
                the stream broke and why it could not be resumed.
        """
        node = dead.node
        await dead.release()  # cancel it there (a frozen node reads it when it wakes up)
        if node is not None:
            self._failed.add(node)
        started = time.monotonic()
        while True:
            if self._too_long:
                raise self._broken(cause, "the generation is too long to resume")
            if self.resumes >= MAX_RESUMES:
                raise self._broken(cause, f"gave up after {self.resumes} resumes")
            self.resumes += 1
            job = self._continuation()
            log.warning("job=%s %s; resuming after %d tokens (attempt %d), not on %s",
                        self._job.job_id, cause, len(self._ids), self.resumes,
                        ", ".join(sorted(self._failed)))
            try:
                stream, accepted = await start_job(self._bus, job, exclude=self._failed)
            except ApiError as exc:
                raise self._broken(cause, exc.message) from None
            if accepted.resumed_tokens == len(self._ids):
                log.info("job=%s resumed on %s as %s after %d tokens in %.2fs",
                         self._job.job_id, accepted.node, job.job_id, len(self._ids),
                         time.monotonic() - started)
                return stream, accepted
            # A neuron that does not know resuming would start over: never let it answer.
            log.warning("job=%s neuron '%s' cannot resume generations; trying another",
                        self._job.job_id, accepted.node)
            self._failed.add(accepted.node)
            await stream.release()

    def _continuation(self) -> JobRequest:
        base = self._job.job_id[:120]
        return msgspec.structs.replace(
            self._job, job_id=f"{base}-r{self.resumes}",
            resume=ResumeState(token_ids=tuple(self._ids), resumed_from=self._job.job_id),
        )

    def _broken(self, cause: BusError, why: str) -> ApiError:
        log.warning("job=%s %s; not resumed: %s", self._job.job_id, cause, why)
        return ApiError(Reason.STREAM_BROKEN, f"the stream from the neuron broke: {cause}; "
                                              f"it could not be resumed: {why}")
