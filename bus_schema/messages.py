"""The v1 bus messages: the contract between gateways and neurons.

Every message is a frozen, keyword-only msgspec Struct tagged by ``kind``, so one decoder per
direction (`JobEvent`, `FleetEvent`, `ControlRequest`) turns bytes into exactly one type and
``nats sub 'cortex.>'`` shows self-describing JSON.

The job stream protocol (on the job's reply inbox):

1. `JobAccepted` (``seq=0``) — or `JobFailed` (``seq=0``) when admission fails, before any token;
2. `TokenChunk` × N, ``seq`` = 1, 2, 3 … without gaps;
3. exactly one terminal `JobFinished` or `JobFailed` with the next ``seq``.

A gateway that sees a gap, a duplicate or silence knows something was lost. A job whose neuron
died mid-stream continues on another one as a new job with `JobRequest.resume` (failover).

Schema evolution: new fields always get defaults; a field's type or meaning never changes; tags are
never reused; unknown fields are ignored on decode. Anything else gets ``v2`` subjects.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from bus_schema.errors import ErrorCode

PROTOCOL_VERSION: Final = 1
#: Longest job id (it is the last token of the job's reply inbox).
MAX_JOB_ID: Final = 128

JobId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_JOB_ID)]
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
NodeName = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^.*>\s]+$")]
Seq = Annotated[int, msgspec.Meta(ge=0)]
#: A short free-text field read from the bus (names, messages): bounded like everything else.
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]
#: Most entries a fleet message may list (models, devices, activation ids).
MAX_LISTED = 1024
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
#: Seconds since the Unix epoch.
Timestamp = float
TemplateValue = str | int | float | bool | None


class BusMessage(msgspec.Struct, frozen=True, tag_field="kind"):
    """Base of every bus message: frozen, tagged by ``kind``."""


# --------------------------------------------------------------------------- jobs


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to sample. The gateway validates ranges before publishing."""

    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """None: up to the model's context length."""
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.7
    """0 means greedy."""
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: NonNegInt = 0
    """0 disables top-k."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    """None: the neuron's default."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class ToolCallFunction(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    function: ToolCallFunction
    type: Literal["function"] = "function"


class ToolDefinition(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A function the model may call; reaches the chat template as OpenAI's
    ``{"type": "function", "function": {name, description, parameters}}``."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    """JSON Schema of the arguments object."""


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One conversation turn with its content already flattened to text by the gateway."""

    role: str
    content: str | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning_content: str | None = None


#: Most delivered tokens a resumed job may carry; a longer generation is not resumed.
MAX_RESUME_TOKENS: Final = 65536


class ResumeState(msgspec.Struct, frozen=True, kw_only=True):
    """A generation to continue where another neuron left it (failover): the neuron appends
    ``token_ids`` to the prompt, replays them through its detokenizer, stop matcher and output
    router without sending them, then streams only new tokens; its `JobFinished` counts them
    among the completion tokens."""

    token_ids: Annotated[tuple[NonNegInt, ...], msgspec.Meta(max_length=MAX_RESUME_TOKENS)]
    """Ids of every token the client was sent so far, in order."""
    resumed_from: JobId
    """The job id of the first attempt (logs)."""


class JobRequest(BusMessage, frozen=True, tag="job", kw_only=True):
    """Run one generation. Published on `job_subject` (or `node_job_subject`) with a reply inbox."""

    job_id: JobId
    model: ModelId
    """Canonical id (aliases already resolved)."""
    messages: tuple[ChatMessage, ...] = ()
    """Chat input, rendered with the model's chat template. Exactly one of messages/prompt."""
    prompt: str | None = None
    """Raw text input (``/v1/completions``); no template applied."""
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    chat_template_kwargs: dict[str, TemplateValue] = msgspec.field(default_factory=dict)
    tools: tuple[ToolDefinition, ...] = ()
    """Passed to the chat template; the neuron parses the model's tool calls out of its output."""
    deadline: Timestamp | None = None
    """Wall-clock time after which the neuron stops generating (guards against lost cancels)."""
    gateway: str = ""
    """Which gateway sent it (logs only)."""
    resume: ResumeState | None = None
    """Continue a generation that broke off elsewhere (see `ResumeState`)."""


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: NonNegInt
    completion_tokens: NonNegInt


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    """Where the time went on the neuron, in milliseconds."""

    queue_ms: float = 0.0
    """Accepted until the model's thread started on it."""
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


class JobAccepted(BusMessage, frozen=True, tag="accepted", kw_only=True):
    """First event of a stream: who runs the job (whom to cancel) and the real prompt size."""

    job_id: JobId
    seq: Seq = 0
    node: NodeName
    model: ModelId
    prompt_tokens: NonNegInt
    max_tokens: NonNegInt
    """The completion budget after clamping to the context length."""
    resumed_tokens: NonNegInt = 0
    """For a resumed job: how many delivered tokens it continues from (0 from a neuron that does
    not know `JobRequest.resume`, which would start over: the gateway cancels that job)."""


class EmittedToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A complete tool call the model made (parsed from its ``<tool_call>`` output)."""

    index: NonNegInt
    """0, 1, 2 … in the order the model made them within this job."""
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    name: str
    arguments: str
    """JSON text of the arguments object."""


class TokenChunk(BusMessage, frozen=True, tag="tok", kw_only=True, gc=False, omit_defaults=True):
    """Output produced since the previous chunk (several tokens coalesced), routed by kind.

    Within one chunk the order is: ``reasoning``, then ``text``, then ``tool_calls``; the neuron
    starts a new chunk rather than reorder output. A job that made tool calls finishes with
    ``finish_reason="stop"``; the gateway reports it as ``tool_calls``.
    """

    job_id: JobId
    seq: Seq
    text: str = ""
    """Answer text (reasoning markers and tool calls never appear here)."""
    token_ids: tuple[int, ...] = ()
    reasoning: str = ""
    """Text the model produced inside its reasoning markers (``<think>``…``</think>``)."""
    tool_calls: tuple[EmittedToolCall, ...] = ()


FinishReason = Literal["stop", "length", "cancelled"]


class JobFinished(BusMessage, frozen=True, tag="end", kw_only=True):
    """Terminal event: the generation ended normally."""

    job_id: JobId
    seq: Seq
    finish_reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None
    """The stop string that matched, if any."""
    timings: Timings = msgspec.field(default_factory=Timings)


class JobFailed(BusMessage, frozen=True, tag="fail", kw_only=True):
    """Terminal event: the job failed. ``seq=0`` means before acceptance (no token was sent)."""

    job_id: JobId
    seq: Seq
    code: ErrorCode
    message: str
    retryable: bool = False
    prompt_tokens: NonNegInt | None = None
    """For ``prompt_too_long``: the prompt's size."""
    max_prompt_tokens: NonNegInt | None = None
    """For ``prompt_too_long``: the limit."""


JobEvent = JobAccepted | TokenChunk | JobFinished | JobFailed

# --------------------------------------------------------------------------- fleet state


class Device(msgspec.Struct, frozen=True, kw_only=True):
    index: Annotated[int, msgspec.Meta(ge=0, le=MAX_LISTED)]
    kind: Literal["cpu", "cuda", "mps"]
    name: Annotated[str, msgspec.Meta(max_length=256)]
    memory_total_mb: NonNegInt
    memory_free_mb: NonNegInt
    """Physical free memory (CUDA: ``torch.cuda.mem_get_info``; CPU: MemAvailable)."""
    budget_mb: NonNegInt | None = None
    """How much of this device the neuron may fill with models (``memory_budget_mb``)."""
    models_mb: NonNegInt = 0
    """What the resident (and loading) models on this device take, as the neuron accounts them."""


class HostInfo(msgspec.Struct, frozen=True, kw_only=True):
    hostname: Annotated[str, msgspec.Meta(max_length=256)]
    cpu_count: NonNegInt
    memory_total_mb: NonNegInt
    memory_available_mb: NonNegInt


ModelStatus = Literal["loaded", "loading", "unloaded", "reloading", "poisoned", "recovering"]


class ResidentModel(msgspec.Struct, frozen=True, kw_only=True):
    """A model a neuron holds (or is loading)."""

    id: ModelId
    """Canonical bare id (``org/name``)."""
    status: ModelStatus
    source: str | None = None
    """Scheme it was loaded from (``huggingface``, ``file``…), kept apart from the id."""
    engine: str = ""
    format: str = ""
    context_length: NonNegInt | None = None
    memory_mb: NonNegInt | None = None
    device: str = ""
    pinned: bool = False
    jobs_running: NonNegInt = 0
    jobs_waiting: NonNegInt = 0
    load_progress: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    loaded_at: Timestamp | None = None
    """When the weights became resident (the residency floor counts from here)."""
    last_used_at: Timestamp | None = None
    """When a job for it last started (the LRU clock every gateway shares); None: never."""
    devices: tuple[NonNegInt, ...] = ()
    """Indices (into `Heartbeat.devices`) of the devices it occupies."""


class FailedActivation(msgspec.Struct, frozen=True, kw_only=True):
    model_id: ModelId
    error: ShortText


class ActivationState(msgspec.Struct, frozen=True, kw_only=True):
    """Pre-warm progress of the neuron's default models (REFERENCE §2.3)."""

    state: Literal["pre_warming", "ready"] = "ready"
    pending: Annotated[tuple[ModelId, ...], msgspec.Meta(max_length=MAX_LISTED)] = ()
    in_progress: Annotated[tuple[ModelId, ...], msgspec.Meta(max_length=MAX_LISTED)] = ()
    completed: Annotated[tuple[ModelId, ...], msgspec.Meta(max_length=MAX_LISTED)] = ()
    failed: Annotated[tuple[FailedActivation, ...], msgspec.Meta(max_length=MAX_LISTED)] = ()


class Heartbeat(BusMessage, frozen=True, tag="heartbeat", kw_only=True):
    """A neuron's full state; published every ``interval_s`` and in answer to discovery."""

    node: NodeName
    seq: Seq
    """Counts heartbeats since the neuron started; a restart resets it."""
    sent_at: Timestamp
    interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=60.0)]
    """Bounded: a node claiming a tiny interval would flap, a huge one would never go stale."""
    started_at: Timestamp
    protocol: int = PROTOCOL_VERSION
    version: str = ""
    host: HostInfo | None = None
    devices: Annotated[tuple[Device, ...], msgspec.Meta(max_length=64)] = ()
    models: Annotated[tuple[ResidentModel, ...], msgspec.Meta(max_length=MAX_LISTED)] = ()
    activation: ActivationState = msgspec.field(default_factory=ActivationState)
    jobs_running: NonNegInt = 0
    max_jobs: NonNegInt = 0
    draining: bool = False
    dropped_messages: NonNegInt = 0
    """Bad bus messages this node dropped since it started (`bus_schema.drops`)."""
    jobs: Annotated[tuple[JobId, ...], msgspec.Meta(max_length=MAX_LISTED)] | None = None
    """Ids of the jobs this node has accepted and not yet ended (running or waiting for a place in
    a batch); None: not listed (older neurons, or more than `MAX_LISTED`). A gateway whose stream
    of a job falls silent learns from it that the job ended and its last events were lost."""


ActivationEventKind = Literal[
    "queued", "started", "progress", "ready", "failed", "unloaded", "evicted", "draining",
    "stopping",
]


class Activation(BusMessage, frozen=True, tag="activation", kw_only=True):
    """A change in a neuron's models, published when it happens (not on the heartbeat clock)."""

    node: NodeName
    event: ActivationEventKind
    model: ModelId | None = None
    """None for node-wide events (draining, stopping)."""
    at: Timestamp
    progress: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    message: ShortText = ""


class DiscoverRequest(BusMessage, frozen=True, tag="discover", kw_only=True):
    """Asks every neuron to answer at once with its `Heartbeat`."""

    gateway: str


FleetEvent = Heartbeat | Activation

# --------------------------------------------------------------------------- control


class LoadRequest(BusMessage, frozen=True, tag="load", kw_only=True):
    """``ctl.load``: make a model resident (REFERENCE §5.2 load spec)."""

    model_id: str
    """``org/name``, ``scheme:org/name`` or a local path the neuron can see."""
    harness: str = "torch"
    quant: str | None = None
    tensor_parallel: Annotated[int, msgspec.Meta(ge=1)] | None = None
    devices: tuple[NonNegInt, ...] = ()
    pinned: bool = False
    memory_mb: NonNegInt | None = None
    """The catalogue's estimate (``vram_mb``); the neuron accounts the larger of it and its own."""


class UnloadRequest(BusMessage, frozen=True, tag="unload", kw_only=True):
    model_id: str
    evict: bool = False
    """An eviction (cold-load pressure): refused with 409 for a model pinned on the node."""


class PinRequest(BusMessage, frozen=True, tag="pin", kw_only=True):
    model_id: str
    pinned: bool = True


class CancelJob(BusMessage, frozen=True, tag="cancel", kw_only=True):
    """``ctl.cancel``: stop a running job (the client went away)."""

    job_id: JobId
    reason: str = "client disconnected"


class DrainRequest(BusMessage, frozen=True, tag="drain", kw_only=True):
    """Stop taking jobs, finish those in flight."""

    deadline_s: Annotated[float, msgspec.Meta(ge=0.0)] = 30.0


class TokenizeRequest(BusMessage, frozen=True, tag="tokenize", kw_only=True):
    """Count tokens the way a job would (chat template included); never generates."""

    model: ModelId
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    chat_template_kwargs: dict[str, TemplateValue] = msgspec.field(default_factory=dict)
    tools: tuple[ToolDefinition, ...] = ()


ControlRequest = (
    LoadRequest | UnloadRequest | PinRequest | CancelJob | DrainRequest | TokenizeRequest
)


PreflightKind = Literal[
    "repo_fetch_failed", "empty_repo", "tp_requires_safetensors", "quant_not_found",
]


class PreflightFailure(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Why a load was refused before any download (REFERENCE §6.6); the reference's body fields."""

    kind: PreflightKind
    model_id: str
    cause: str | None = None
    """``repo_fetch_failed``: what went wrong listing the repo."""
    tp_size: NonNegInt | None = None
    gguf_quants: tuple[str, ...] | None = None
    suggestion: str | None = None
    requested: str | None = None
    """``quant_not_found``: the quant asked for."""
    available: tuple[str, ...] | None = None
    nearest: str | None = None
    """``quant_not_found``: the Levenshtein-closest quant token, when there is one."""


class ControlReply(BusMessage, frozen=True, tag="reply", kw_only=True):
    """Answer to any control request: an HTTP-like ``status`` and the reference body fields."""

    status: int
    message: str = ""
    code: ErrorCode | None = None
    model: ModelId | None = None
    tokens: NonNegInt | None = None
    """For ``tokenize``."""
    preflight: PreflightFailure | None = None
    """For a ``load`` refused by preflight (status 422)."""
    memory_mb: NonNegInt | None = None
    """For ``load``: what the model is accounted at on the node."""
