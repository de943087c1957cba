"""From a dialect's translated request to a bus job: `JobDraft` and the one place that stamps it.

Dialect-neutral. Dialects translate their request into a `JobDraft`; `stamp` is the one place that
turns a draft into a bus `JobRequest` (concrete model id, job id, deadline, gateway id, sampling
defaults). Where it runs is `cortex.routing`'s business.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from bus_schema.messages import (
    ChatMessage,
    JobRequest,
    SamplingParams,
    TemplateValue,
    ToolDefinition,
)
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
    """The bus job for ``draft``: the concrete model id (aliases resolved; responses keep naming
    the model the client asked for), a fresh job id, the deadline, this gateway, defaults."""
    s = draft.sampling
    return JobRequest(
        job_id=job_id or uuid.uuid4().hex,
        model=settings.catalogue.resolve(draft.model),
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
