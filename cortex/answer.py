"""How a stamped job becomes an HTTP answer, for every dialect: admission (a model that must be
loaded first gets a place in its wait queue), start on a replica, then one JSON body or an event
stream. A routable model's stream starts after acceptance, so refusals keep their status; one
that must be loaded first starts at once with keep-alives while the request waits, and a failure
to load or start becomes the dialect's error event. Dialects supply only their rendering."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from litestar import Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from bus_schema.messages import JobAccepted, JobRequest
from cortex.auth import require_model
from cortex.bus import JobStream
from cortex.context import Gateway
from cortex.errors import ApiError
from cortex.http import SSE, SSE_HEADERS, AnyRequest, disconnect_waiter, json_response
from cortex.manager import ColdWait, FleetManager
from cortex.relay import Completion, collect

log = logging.getLogger(__name__)

#: A dialect's event stream for an accepted job (its opening included).
Begin = Callable[[JobStream, JobAccepted], AsyncIterator[bytes]]


@dataclass(frozen=True)
class Rendering:
    """What a dialect renders: its stream, its keep-alive, a failure before the stream began,
    and the one-body answer."""

    begin: Begin
    keepalive: bytes
    failed: Callable[[ApiError], bytes]
    body: Callable[[Completion], bytes]


async def answer(
    request: AnyRequest, gw: Gateway, job: JobRequest, *, streaming: bool,
    headers: dict[str, str], rendering: Rendering,
) -> Response[bytes] | Stream:
    """Run ``job`` and answer it (see the module docstring).

    Raises:
        ApiError: before any byte of the answer (unknown model, queue full, refusals).
    """
    require_model(request, job.model)
    wait = await gw.fleet.admit(job.model)
    if streaming and wait is not None:
        started: list[JobStream] = []
        return Stream(stream_when_ready(gw.fleet, wait, job, rendering,
                                        keepalive_s=gw.settings.keepalive_interval_s,
                                        started=started),
                      media_type=SSE, headers={**SSE_HEADERS, **headers},
                      background=BackgroundTask(release_all, started))
    if wait is not None:
        try:
            await wait.until_ready(disconnect_waiter(request))
        finally:
            wait.close()
    stream, accepted = await gw.fleet.start(job)
    if streaming:
        return Stream(rendering.begin(stream, accepted), media_type=SSE,
                      headers={**SSE_HEADERS, **headers},
                      background=BackgroundTask(stream.release))
    done = await collect(stream, accepted, disconnect_waiter(request))
    return json_response(rendering.body(done), headers=headers)


async def stream_when_ready(
    manager: FleetManager, wait: ColdWait, job: JobRequest, rendering: Rendering, *,
    keepalive_s: float, started: list[JobStream],
) -> AsyncIterator[bytes]:
    """An event stream committed before its model is loaded: a keep-alive at once and every
    ``keepalive_s`` while the request waits, then the job's own stream; a failure to load or
    start becomes the dialect's error event. The started job stream is appended to ``started``
    for the response to release."""
    try:
        try:
            yield rendering.keepalive
            while not await wait.wait(keepalive_s):
                yield rendering.keepalive
        finally:
            wait.close()
        stream, accepted = await manager.start(job)
    except ApiError as exc:
        log.info("job=%s failed before its stream began: %s", job.job_id, exc.message)
        yield rendering.failed(exc)
        return
    started.append(stream)
    async for chunk in rendering.begin(stream, accepted):
        yield chunk


async def release_all(streams: list[JobStream]) -> None:
    """Release every job stream a cold-start response started (see `stream_when_ready`)."""
    for stream in streams:
        await stream.release()
