"""Where an accepted job runs (REFERENCE §5.1): the least-loaded healthy replica on its directed
subject, the next one while one is busy, loses the model or does not accept in time.

`start_job` is the one place that decides whether and where a stamped job runs; every outcome
that is not an accepted stream is an `ApiError`. A failover (`cortex.failover`) starts its
continuation here too, excluding the nodes that failed the job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Final

from bus_schema.messages import JobAccepted, JobFailed, JobRequest
from bus_schema.subjects import node_job_subject
from cortex.bus import (
    BusUnavailableError,
    GatewayBus,
    JobStream,
    NoRespondersError,
    PayloadTooLargeError,
    StreamProtocolError,
    StreamTimeoutError,
)
from cortex.errors import ApiError, Reason, from_job_failure, model_not_found

log = logging.getLogger(__name__)


async def check_routable(bus: GatewayBus, model: str) -> None:
    """Raise the right error when no healthy node has ``model`` loaded.

    Right after start-up the fleet view may still be filling from discovery: a model that is not
    (yet) known waits for the discovery window before it is called unknown.

    Raises:
        ApiError: unknown model; loading; only on stale or draining nodes.
    """
    if bus.fleet.routable(model):
        return
    if not bus.fleet.locations(model):
        await bus.discovered()
        if bus.fleet.routable(model):
            return
    locations = bus.fleet.locations(model)
    if not locations:
        raise model_not_found(model)
    loading = [loc.node for loc in locations if loc.healthy and loc.status == "loading"]
    if loading:
        raise ApiError(Reason.MODEL_LOADING,
                       f"model '{model}' is loading on {', '.join(loading)}; retry shortly")
    healthy, _ = bus.fleet.health()
    if not healthy:
        raise ApiError(Reason.NO_WORKER, "no healthy nodes available")
    raise ApiError(Reason.NO_WORKER, f"no healthy node currently serves model '{model}'")


#: Refusals another replica may not share: try the next one before answering.
_TRY_ELSEWHERE: Final = frozenset({
    Reason.OVERLOADED, Reason.MODEL_NOT_LOADED, Reason.SHUTTING_DOWN, Reason.ACCEPT_TIMEOUT,
})


def replicas(bus: GatewayBus, model: str) -> list[str]:
    """Healthy nodes with ``model`` loaded, least loaded first: by the larger of what the node's
    last heartbeat said and what this gateway has started there since (heartbeats lag a second).
    Stale and draining nodes are not among them."""
    found = bus.fleet.routable(model)
    found.sort(key=lambda loc: (max(loc.jobs_running, bus.running_on(loc.node)), loc.node))
    return [loc.node for loc in found]


async def start_job(
    bus: GatewayBus, job: JobRequest, *, exclude: Collection[str] = ()
) -> tuple[JobStream, JobAccepted]:
    """Send ``job`` to the least-loaded replica of its model (other than those in ``exclude``),
    and on to the next while one is busy, loses the model, or does not accept in time; return
    the accepted stream.

    Raises:
        ApiError: the job could not start (routing, bus, or admission failure); when every
            replica refused, the last refusal.
    """
    await check_routable(bus, job.model)
    nodes = [node for node in replicas(bus, job.model) if node not in exclude]
    if not nodes:
        raise ApiError(Reason.NO_WORKER, f"no other healthy node serves model '{job.model}'")
    settings = bus.settings
    refusal: ApiError | None = None
    for i, node in enumerate(nodes):
        last = i == len(nodes) - 1
        timeout = settings.accept_timeout_s if last else settings.replica_accept_timeout_s
        try:
            return await _start_on(bus, job, node, timeout)
        except ApiError as exc:
            if exc.reason not in _TRY_ELSEWHERE or last:
                raise
            log.info("job=%s %s on %s; trying the next replica", job.job_id, exc.reason, node)
            refusal = exc
    raise refusal or ApiError(Reason.NO_WORKER,
                              f"no healthy node currently serves model '{job.model}'")


async def _start_on(
    bus: GatewayBus, job: JobRequest, node: str, timeout_s: float
) -> tuple[JobStream, JobAccepted]:
    """Publish ``job`` to ``node`` and wait for its acceptance.

    Raises:
        ApiError: the node refused, has not got the model, or did not accept within
            ``timeout_s`` (then it is told to cancel the job, so it never runs it later).
    """
    try:
        stream = await bus.submit(job, subject=node_job_subject(node, job.model,
                                                                root=bus.settings.root))
    except PayloadTooLargeError as exc:
        raise ApiError(Reason.TOO_LARGE, str(exc)) from None
    except BusUnavailableError as exc:
        raise ApiError(Reason.BUS_DOWN, f"message bus unavailable: {exc}") from None
    # counted as running there while it waits for acceptance: requests that arrive together are
    # spread over the replicas, not all offered to the one that was least loaded before them
    bus.started(node)
    try:
        first = await stream.first(timeout_s)
    except asyncio.CancelledError:  # the client went away: the node must not run it later
        stream.close()
        await bus.cancel(node, job.job_id, "the client went away before the job was accepted")
        raise
    except NoRespondersError:
        stream.close()
        raise ApiError(Reason.MODEL_NOT_LOADED,
                       f"neuron '{node}' is not serving model '{job.model}' right now") from None
    except StreamTimeoutError:
        stream.close()
        await bus.cancel(node, job.job_id, "not accepted in time; the job went elsewhere")
        raise ApiError(Reason.ACCEPT_TIMEOUT,
                       f"neuron '{node}' did not accept the job within {timeout_s:g}s") from None
    except StreamProtocolError as exc:
        stream.close()
        await bus.cancel(node, job.job_id, "its first reply was not readable")
        raise ApiError(Reason.BAD_REPLY, f"bad reply from neuron '{node}': {exc}") from None
    finally:
        bus.ended(node)
    if isinstance(first, JobFailed):
        stream.close()
        log.info("job=%s refused by %s: %s %s", job.job_id, node, first.code, first.message)
        raise from_job_failure(first)
    if not isinstance(first, JobAccepted):
        stream.close()
        await bus.cancel(node, job.job_id, "its first reply was not an acceptance")
        raise ApiError(Reason.BAD_REPLY,
                       f"bad reply from neuron '{node}': expected acceptance, "
                       f"got {type(first).__name__}")
    log.info("job=%s accepted by %s model=%s prompt_tokens=%d", job.job_id, first.node,
             job.model, first.prompt_tokens)
    return stream, first
