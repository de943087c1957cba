"""Run one job: admission, prompt, generation on the model's thread, and the event stream.

The stream is exactly: `JobAccepted` (seq 0) or an admission `JobFailed` (seq 0), then `TokenChunk`s
with contiguous ``seq``, then one terminal `JobFinished`/`JobFailed`. Tokens are coalesced: each
chunk carries everything the model produced since the previous publish (up to
``chunk_max_tokens``), so a fast model sends few messages and a slow one sends each token at once.

A job with `JobRequest.resume` continues a generation another neuron started (failover): it is
accepted and generated after the delivered tokens, which only their replay sees (`neuron.resume`).

This is the only place in the neuron that catches broad exceptions: an engine failure becomes a
`JobFailed` for this job, and the neuron takes the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, assert_never

from bus_schema.errors import ErrorCode
from bus_schema.messages import (
    ChatMessage,
    EmittedToolCall,
    JobRequest,
    TemplateValue,
    Timings,
    TokenChunk,
    ToolDefinition,
    Usage,
)
from neuron.admission import Admission, Refusal, Ticket
from neuron.engines.base import (
    STARTED,
    BatchingModel,
    Finish,
    GenerationParams,
    LoadedModel,
    Started,
    Step,
)
from neuron.errors import ChatTemplateError, NeuronError
from neuron.job_events import JobEvents, Publish
from neuron.output_router import (
    OutputRouter,
    Piece,
    ReasoningPiece,
    TextPiece,
    ToolCallPiece,
    prompt_opens_reasoning,
)
from neuron.residency import ModelSlot
from neuron.resume import ResumedText, id_decoder
from neuron.settings import NeuronSettings

log = logging.getLogger(__name__)

_STARTED = object()
_DONE = object()


class JobLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the job id."""

    def process(
        self, msg: object, kwargs: Mapping[str, object]
    ) -> tuple[object, dict[str, object]]:
        extra = self.extra or {}
        return f"job={extra.get('job_id')} {msg}", dict(kwargs)


def template_messages(messages: tuple[ChatMessage, ...]) -> list[dict[str, object]]:
    """Bus chat messages → the dicts chat templates expect (tool-call arguments as objects)."""
    out: list[dict[str, object]] = []
    for message in messages:
        item: dict[str, object] = {"role": message.role, "content": message.content or ""}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        if message.reasoning_content is not None:
            item["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            calls: list[dict[str, object]] = []
            for call in message.tool_calls:
                try:
                    arguments: object = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError:
                    arguments = call.function.arguments
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            item["tool_calls"] = calls
        out.append(item)
    return out


def template_tools(tools: tuple[ToolDefinition, ...]) -> list[dict[str, object]]:
    """Bus tool definitions → OpenAI-shaped tools, as chat templates (and the router) expect."""
    out: list[dict[str, object]] = []
    for tool in tools:
        function: dict[str, object] = {"name": tool.name, "parameters": tool.parameters}
        if tool.description is not None:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    tools: list[dict[str, object]]


def prepare_prompt(
    model: LoadedModel,
    *,
    messages: tuple[ChatMessage, ...] = (),
    prompt: str | None = None,
    tools: tuple[ToolDefinition, ...] = (),
    chat_template_kwargs: Mapping[str, TemplateValue] | None = None,
) -> Prompt:
    """Render (for chat input) and tokenise; blocking, CPU-bound (run off the loop). Jobs and
    ``ctl.tokenize`` both count with this one function, so their counts agree.

    Raises:
        ChatTemplateError: the template refused the messages.
    """
    if prompt is not None:
        return Prompt(prompt, model.encode(prompt), [])
    shaped = template_tools(tools)
    text = model.render_chat(
        template_messages(messages), tools=shaped or None,
        template_kwargs=chat_template_kwargs or None,
    )
    return Prompt(text, model.encode(text), shaped)


def job_prompt(model: LoadedModel, job: JobRequest) -> Prompt:
    return prepare_prompt(model, messages=job.messages, prompt=job.prompt, tools=job.tools,
                          chat_template_kwargs=job.chat_template_kwargs)


@dataclass(frozen=True, slots=True)
class _Routed:
    """One generated token's id (None for the held-back tail at the end) and the output it
    released, already routed on the model's thread."""

    token_id: int | None
    pieces: list[Piece]


class _ChunkBuilder:
    """Collects routed output for the next `TokenChunk`, whose fields have a fixed order
    (reasoning, text, tool calls): a piece that would go back in that order starts a new chunk."""

    def __init__(self, job_id: str) -> None:
        self._job_id = job_id
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []
        self._reasoning: list[str] = []
        self._text: list[str] = []
        self._calls: list[EmittedToolCall] = []
        self._stage = 0

    def add_id(self, token_id: int) -> None:
        self._ids.append(token_id)

    def fits(self, piece: Piece) -> bool:
        return _STAGE[type(piece)] >= self._stage

    def add(self, piece: Piece) -> None:
        match piece:
            case ReasoningPiece(text=text):
                self._reasoning.append(text)
            case TextPiece(text=text):
                self._text.append(text)
            case ToolCallPiece():
                self._calls.append(EmittedToolCall(index=piece.index, id=piece.id,
                                                   name=piece.name, arguments=piece.arguments))
            case _:
                assert_never(piece)
        self._stage = _STAGE[type(piece)]

    def take(self, seq: int) -> TokenChunk | None:
        """The chunk collected so far, numbered ``seq`` (None when there is nothing to send)."""
        if not (self._reasoning or self._text or self._calls):
            return None
        chunk = TokenChunk(job_id=self._job_id, seq=seq, text="".join(self._text),
                           reasoning="".join(self._reasoning), tool_calls=tuple(self._calls),
                           token_ids=tuple(self._ids))
        self._reset()
        return chunk


_STAGE: Final[dict[type, int]] = {ReasoningPiece: 0, TextPiece: 1, ToolCallPiece: 2}
#: How many early cancels a neuron remembers (a cancel costs a job id of at most 128 bytes).
_CANCELLED_EARLY_KEPT: Final = 4096


class JobRunner:
    """Runs jobs against resident models and publishes their streams."""

    def __init__(self, settings: NeuronSettings, admission: Admission) -> None:
        self._settings = settings
        self._admission = admission
        self._cancels: dict[str, threading.Event] = {}
        self._cancelled_early: OrderedDict[str, None] = OrderedDict()
        """Jobs cancelled before they arrived here (a gateway gave up waiting and went
        elsewhere): never run them if they turn up later, e.g. after the process was frozen."""

    def cancel(self, job_id: str) -> bool:
        """Ask a running job to stop; False if it is not running here, in which case it will not
        be run if it arrives later."""
        event = self._cancels.get(job_id)
        if event is None:
            self._cancelled_early[job_id] = None
            while len(self._cancelled_early) > _CANCELLED_EARLY_KEPT:
                self._cancelled_early.popitem(last=False)
            return False
        event.set()
        return True

    def cancel_all(self) -> None:
        for event in self._cancels.values():
            event.set()

    @property
    def job_ids(self) -> tuple[str, ...]:
        """The jobs admitted here and not yet ended (running or waiting for a place); each
        leaves after its terminal event was published."""
        return tuple(self._cancels)

    async def run(self, job: JobRequest, slot: ModelSlot | None, publish: Publish) -> None:
        """Run ``job`` to its terminal event. Never raises except `CancelledError`; a failure
        anywhere ends the job's stream with `JobFailed`."""
        jlog = JobLog(log, {"job_id": job.job_id})
        if job.job_id in self._cancelled_early:
            del self._cancelled_early[job.job_id]
            jlog.info("cancelled before it arrived; not run")
            return
        events = JobEvents(job.job_id, publish)
        if job.job_id in self._cancels:  # its cancel would reach only one of the two
            await events.fail(ErrorCode.INVALID_REQUEST,
                              f"a job with id '{job.job_id}' is already running here")
            return
        if slot is None or slot.model is None or slot.status != "loaded":
            await events.fail(ErrorCode.MODEL_NOT_LOADED,
                              f"model '{job.model}' not loaded on this neuron", retryable=True)
            return
        ticket = self._admission.admit(slot)
        if isinstance(ticket, Refusal):
            await events.fail(ticket.code, ticket.message, retryable=True)
            return
        cancelled = threading.Event()
        self._cancels[job.job_id] = cancelled
        try:
            await self._run_admitted(job, slot, ticket, events, cancelled, jlog)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        except Exception:  # noqa: BLE001 - the one broad catch: reported to the gateway below
            jlog.exception("job failed")
            with contextlib.suppress(Exception):  # the bus itself may be what failed
                await events.fail(ErrorCode.ENGINE_ERROR,
                                  "internal error in the neuron; see its log for job "
                                  f"{job.job_id}")
        finally:
            ticket.close()
            self._cancels.pop(job.job_id, None)

    async def _run_admitted(
        self,
        job: JobRequest,
        slot: ModelSlot,
        ticket: Ticket,
        events: JobEvents,
        cancelled: threading.Event,
        jlog: JobLog,
    ) -> None:
        model = slot.require()
        loop = asyncio.get_running_loop()
        accepted_at = time.monotonic()
        context = model.info.context_length
        try:
            prompt = await asyncio.to_thread(job_prompt, model, job)
        except ChatTemplateError as exc:
            await events.fail(ErrorCode.TEMPLATE_ERROR, str(exc))
            return
        if cancelled.is_set():  # the gateway gave up waiting while the prompt was prepared
            jlog.info("cancelled before it was accepted; not run")
            return
        prompt_ids = prompt.ids
        limit = min(self._settings.max_prompt_tokens, context - 1)
        if len(prompt_ids) > limit:
            await events.fail(ErrorCode.PROMPT_TOO_LONG,
                              f"prompt has {len(prompt_ids)} tokens but max is {limit}",
                              prompt_tokens=len(prompt_ids), max_prompt_tokens=limit)
            return
        budget = context - len(prompt_ids)
        max_tokens = min(job.params.max_tokens or budget, budget)
        # Raw prompts (/v1/completions) are not routed: their output is text, markers included.
        router = None if job.prompt is not None else OutputRouter(
            start_in_reasoning=prompt_opens_reasoning(prompt.text), tools=prompt.tools,
            parse_tools=bool(job.tools), job_id=job.job_id,
        )
        resumed: ResumedText | None = None
        if job.resume is not None:
            resumed = await self._resume(job, model, router, events, jlog)
            if resumed is None or cancelled.is_set():
                return
        delivered = job.resume.token_ids if job.resume is not None else ()
        await events.accept(node=self._settings.name, model=job.model,
                            prompt_tokens=len(prompt_ids), max_tokens=max_tokens,
                            resumed_tokens=len(delivered))
        params = GenerationParams(
            max_tokens=max(max_tokens - len(delivered), 0),
            temperature=job.params.temperature,
            top_p=job.params.top_p,
            top_k=job.params.top_k,
            seed=job.params.seed,
            stop=job.params.stop,
            repetition_penalty=(
                job.params.repetition_penalty
                if job.params.repetition_penalty is not None
                else self._settings.default_repetition_penalty
            ),
            repetition_window=self._settings.repetition_window,
            history=delivered,
            presence_penalty=job.params.presence_penalty,
            frequency_penalty=job.params.frequency_penalty,
        )
        queue: asyncio.Queue[_Routed | Finish | BaseException | object] = asyncio.Queue()
        deadline = job.deadline
        expired = threading.Event()

        def split(text: str, *, final: bool = False) -> list[Piece]:  # on the model's thread
            if router is None:
                return [TextPiece(text)] if text else []
            pieces = router.push(text) if text else []
            return pieces + router.flush() if final else pieces

        done = loop.create_future()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def emit(item: Started | Step | Finish | BaseException) -> None:
            # On the engine's thread: output routing, and the deadline.
            match item:
                case Started():
                    put(_STARTED)
                case Step():
                    text = item.text if resumed is None else resumed.step(item.token_id)
                    if text is None:
                        return  # after a stop string the runner matched: the engine is stopping
                    put(_Routed(item.token_id, split(text)))
                    if resumed is not None and resumed.matched is not None:
                        cancelled.set()
                    if deadline is not None and not cancelled.is_set() and time.time() > deadline:
                        expired.set()
                        cancelled.set()
                case Finish():
                    tail, final = (item.text, item) if resumed is None else resumed.finish(item)
                    put(_Routed(None, split(tail, final=True)))
                    put(final)
                    put(_DONE)
                    loop.call_soon_threadsafe(_resolve, done)
                case BaseException():
                    put(item)
                    put(_DONE)
                    loop.call_soon_threadsafe(_resolve, done)
                case _:
                    assert_never(item)

        def run_alone() -> None:  # on the model's thread, for engines that do not batch
            emit(STARTED)
            try:
                for item in model.generate(engine_prompt, params, cancelled):
                    emit(item)
                    if isinstance(item, Finish):
                        return
                emit(RuntimeError("the engine ended without a result"))
            except BaseException as exc:  # noqa: BLE001 - surfaced on the loop as a JobFailed
                emit(exc)

        started_at: float | None = None
        engine_prompt = [*prompt_ids, *delivered]
        if resumed is not None and (resumed.matched is not None or params.max_tokens <= 0):
            emit(STARTED)  # the delivered tokens already ended the generation
            emit(Finish(reason="length", completion_tokens=0))
        elif isinstance(model, BatchingModel):
            try:
                model.submit(engine_prompt, params, cancelled, emit)
            except (ValueError, NeuronError) as exc:
                emit(STARTED)
                emit(exc)
        else:
            loop.run_in_executor(slot.executor, run_alone)
        chunk = _ChunkBuilder(job.job_id)
        finish: Finish | None = None
        error: BaseException | None = None

        async def add(routed: _Routed) -> None:
            if routed.token_id is not None:
                chunk.add_id(routed.token_id)
            for piece in routed.pieces:
                if not chunk.fits(piece):
                    await send()
                chunk.add(piece)

        async def send() -> None:
            await events.chunk(chunk)

        try:
            while True:
                item = await queue.get()
                batch = [item]
                while len(batch) < self._settings.chunk_max_tokens and not queue.empty():
                    batch.append(queue.get_nowait())
                for entry in batch:
                    if entry is _STARTED:
                        started_at = time.monotonic()
                        ticket.started()
                    elif isinstance(entry, _Routed):
                        await add(entry)
                    elif isinstance(entry, Finish):
                        finish = entry
                    elif isinstance(entry, BaseException):
                        error = entry
                await send()
                if _DONE in batch:
                    break
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            await asyncio.shield(done)
            ticket.close()
        if finish is None:
            message = f"{type(error).__name__}: {error}" if error else "engine ended without result"
            jlog.error("generation failed: %s", message, exc_info=error)
            await events.fail(ErrorCode.ENGINE_ERROR, _engine_failure(error))
            return
        if expired.is_set() and finish.reason == "cancelled":
            jlog.info("deadline passed after %d tokens; stopped", finish.completion_tokens)
            await events.fail(ErrorCode.DEADLINE_EXCEEDED,
                              "the job's deadline passed before generation finished")
            return
        queue_s = (started_at or accepted_at) - accepted_at
        reason = finish.reason
        await events.finish(
            reason=reason,
            usage=Usage(prompt_tokens=len(prompt_ids),
                        completion_tokens=finish.completion_tokens),
            stop_sequence=finish.stop_sequence,
            timings=Timings(queue_ms=queue_s * 1e3, prefill_ms=finish.prefill_seconds * 1e3,
                            decode_ms=finish.decode_seconds * 1e3),
        )
        jlog.info(
            "finished model=%s reason=%s prompt=%d completion=%d resumed=%d queue=%.0fms "
            "prefill=%.0fms decode=%.0fms", job.model, reason, len(prompt_ids),
            finish.completion_tokens, len(delivered), queue_s * 1e3,
            finish.prefill_seconds * 1e3, finish.decode_seconds * 1e3,
        )

    async def _resume(
        self, job: JobRequest, model: LoadedModel, router: OutputRouter | None,
        events: JobEvents, jlog: JobLog,
    ) -> ResumedText | None:
        """Replay a resumed job's delivered tokens (`neuron.resume`) through a fresh
        detokenizer, stop matcher and ``router``, off the loop; None after failing the job (ids
        outside the vocabulary, or a model that cannot decode ids outside its engine)."""
        assert job.resume is not None
        delivered = job.resume.token_ids
        vocab = model.info.vocab_size
        if any(i >= vocab for i in delivered):
            await events.fail(ErrorCode.INVALID_REQUEST,
                              f"resumed token ids must be in [0, {vocab})")
            return None
        decode = id_decoder(model)
        if decode is None:
            await events.fail(ErrorCode.ENGINE_ERROR,
                              f"engine '{model.info.engine}' cannot resume a generation")
            return None
        resumed = ResumedText(decode, job.params.stop, delivered)

        def replay() -> None:  # CPU-bound: decodes every delivered token
            for text in resumed.replay():
                if router is not None and text:
                    router.replay(text)

        await asyncio.to_thread(replay)
        jlog.info("resuming job %s after %d delivered tokens", job.resume.resumed_from,
                  len(delivered))
        return resumed


def _engine_failure(error: BaseException | None) -> str:
    """What a client is told when generation failed: our own errors say what happened; library
    errors (torch's text) stay in the neuron's log."""
    if isinstance(error, NeuronError):
        return str(error)
    return "the model failed while generating; see the neuron's log"


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
