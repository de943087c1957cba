"""From a dialect's translated request to an accepted job: stamp the envelope, route, publish, await
acceptance.

Dialect-neutral. Dialects translate their request into a `JobDraft`; `stamp` is the one place that
turns a draft into a bus `JobRequest` (job id, deadline, gateway id, sampling defaults), and
`start_job` the one place that decides whether and where it runs. Every outcome that is not an
accepted stream is an `ApiError`.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from bus_schema.messages import (
    ChatMessage,
    JobAccepted,
    JobFailed,
    JobRequest,
    SamplingParams,
    TemplateValue,
    ToolDefinition,
)
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
from cortex.settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Sampling as the client asked; None means "the gateway's default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass(frozen=True, kw_only=True)
class JobDraft:
    """A request translated out of its dialect, validated, not yet addressed or stamped."""

    model: str
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    tools: tuple[ToolDefinition, ...] = ()
    chat_template_kwargs: dict[str, TemplateValue] = field(default_factory=dict)


def stamp(draft: JobDraft, settings: GatewaySettings, *, job_id: str | None = None) -> JobRequest:
    """The bus job for ``draft``: a fresh job id, the deadline, this gateway, defaults filled in."""
    s = draft.sampling
    return JobRequest(
        job_id=job_id or uuid.uuid4().hex,
        model=draft.model,
        messages=draft.messages,
        prompt=draft.prompt,
        params=SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature if s.temperature is not None
            else settings.default_temperature,
            top_p=s.top_p if s.top_p is not None else 1.0,
            top_k=s.top_k or 0,
            seed=s.seed,
            stop=s.stop,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty or 0.0,
            frequency_penalty=s.frequency_penalty or 0.0,
        ),
        chat_template_kwargs=draft.chat_template_kwargs,
        tools=draft.tools,
        deadline=time.time() + settings.job_deadline_s,
        gateway=settings.gateway_id,
    )


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


async def start_job(bus: GatewayBus, job: JobRequest) -> tuple[JobStream, JobAccepted]:
    """Publish ``job`` and wait for a neuron to accept it.

    Raises:
        ApiError: the job could not start (routing, bus, or admission failure).
    """
    await check_routable(bus, job.model)
    try:
        stream = await bus.submit(job)
    except PayloadTooLargeError as exc:
        raise ApiError(Reason.TOO_LARGE, str(exc)) from None
    except BusUnavailableError as exc:
        raise ApiError(Reason.BUS_DOWN, f"message bus unavailable: {exc}") from None
    try:
        first = await stream.first()
    except NoRespondersError:
        stream.close()
        raise ApiError(Reason.MODEL_NOT_LOADED,
                       f"no neuron is serving model '{job.model}' right now") from None
    except StreamTimeoutError as exc:
        stream.close()
        raise ApiError(Reason.ACCEPT_TIMEOUT, str(exc)) from None
    except StreamProtocolError as exc:
        stream.close()
        raise ApiError(Reason.BAD_REPLY, f"bad reply from neuron: {exc}") from None
    if isinstance(first, JobFailed):
        stream.close()
        log.info("job=%s refused: %s %s", job.job_id, first.code, first.message)
        raise from_job_failure(first)
    if not isinstance(first, JobAccepted):
        stream.close()
        raise ApiError(Reason.BAD_REPLY,
                       f"bad reply from neuron: expected acceptance, got {type(first).__name__}")
    log.info("job=%s accepted by %s model=%s prompt_tokens=%d", job.job_id, first.node,
             job.model, first.prompt_tokens)
    return stream, first
