"""From a resolved job to a started stream: pick where it runs, publish it, await acceptance.

Dialect-neutral: the OpenAI routes use it today and the Anthropic routes will too. Every outcome
that is not an accepted stream is an `ApiError` with the status REFERENCE §5.1 gives.
"""

from __future__ import annotations

import logging

from bus_schema.messages import JobAccepted, JobFailed, JobRequest
from cortex.bus import (
    BusUnavailableError,
    GatewayBus,
    JobStream,
    NoRespondersError,
    PayloadTooLargeError,
    StreamProtocolError,
    StreamTimeoutError,
)
from cortex.errors import ApiError, from_job_failure, model_not_found

log = logging.getLogger(__name__)


def check_routable(bus: GatewayBus, model: str) -> None:
    """Raise the right error when no healthy node has ``model`` loaded.

    Raises:
        ApiError: 404 unknown model; 503 (with ``retry-after``) when it is loading, or only on
            stale or draining nodes.
    """
    if bus.fleet.routable(model):
        return
    locations = bus.fleet.locations(model)
    if not locations:
        raise model_not_found(model)
    loading = [loc.node for loc in locations if loc.healthy and loc.status == "loading"]
    if loading:
        raise ApiError(503, f"model '{model}' is loading on {', '.join(loading)}; retry shortly",
                       code="model_loading", retry_after=5)
    healthy, _ = bus.fleet.health()
    if not healthy:
        raise ApiError(503, "no healthy nodes available", retry_after=5)
    raise ApiError(503, f"no healthy node currently serves model '{model}'", retry_after=5)


async def start_job(bus: GatewayBus, job: JobRequest) -> tuple[JobStream, JobAccepted]:
    """Publish ``job`` and wait for a neuron to accept it.

    Raises:
        ApiError: the job could not start (routing, bus, or admission failure).
    """
    check_routable(bus, job.model)
    try:
        stream = await bus.submit(job)
    except PayloadTooLargeError as exc:
        raise ApiError(413, str(exc), type="invalid_request_error",
                       code="request_too_large") from None
    except BusUnavailableError as exc:
        raise ApiError(503, f"message bus unavailable: {exc}", retry_after=2) from None
    try:
        first = await stream.first()
    except NoRespondersError:
        stream.close()
        raise ApiError(503, f"no neuron is serving model '{job.model}' right now",
                       code="model_not_loaded", retry_after=1) from None
    except StreamTimeoutError as exc:
        stream.close()
        raise ApiError(504, str(exc), code="timeout") from None
    except StreamProtocolError as exc:
        stream.close()
        raise ApiError(502, f"bad reply from neuron: {exc}") from None
    if isinstance(first, JobFailed):
        stream.close()
        log.info("job=%s refused: %s %s", job.job_id, first.code, first.message)
        raise from_job_failure(first)
    if not isinstance(first, JobAccepted):
        stream.close()
        raise ApiError(
            502, f"bad reply from neuron: expected acceptance, got {type(first).__name__}"
        )
    log.info("job=%s accepted by %s model=%s prompt_tokens=%d", job.job_id, first.node,
             job.model, first.prompt_tokens)
    return stream, first
