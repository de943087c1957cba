"""The neuron's control plane: ``cortex.node.<node>.ctl.<verb>`` requests (load, unload, pin,
cancel, drain, tokenize) answered with a `ControlReply` carrying an HTTP-like status and the
reference's body fields. Each request runs in its own task: one subscription's callbacks run one
at a time in nats-py, and a long load must not hold up a cancel.

It works on the node through `Node`, the narrow view of the worker it needs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, assert_never

from nats.aio.msg import Msg

from bus_schema import codec
from bus_schema.errors import ErrorCode
from bus_schema.messages import (
    CancelJob,
    ControlReply,
    ControlRequest,
    DrainRequest,
    LoadRequest,
    PinRequest,
    TokenizeRequest,
    UnloadRequest,
)
from neuron.engines.base import Engine
from neuron.errors import (
    AlreadyLoadedError,
    InsufficientMemoryError,
    NeuronError,
    UnsupportedArchitectureError,
)
from neuron.preflight import PreflightError
from neuron.residency import Residency
from neuron.runner import prepare_prompt
from neuron.settings import ModelSpec

log = logging.getLogger(__name__)


class Node(Protocol):
    """What the control plane may do to its node (the `neuron.worker.Worker`)."""

    @property
    def residency(self) -> Residency: ...

    def engine_for(self, harness: str) -> Engine | str: ...

    async def load(self, spec: ModelSpec, *, memory_mb: int | None = None) -> str: ...

    async def unload(self, model_id: str, *, evict: bool = False) -> None: ...

    def cancel_job(self, job_id: str) -> bool: ...

    async def drain(self) -> None: ...

    async def state_changed(self) -> None: ...


Reply = Callable[[str, bytes], Coroutine[Any, Any, None]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]


class ControlPlane:
    """Answers control requests for one node."""

    def __init__(self, node: Node, *, reply: Reply, spawn: Spawn) -> None:
        """``reply`` publishes an answer on a reply subject; ``spawn`` runs a task the worker
        tracks (and cancels at shutdown)."""
        self._node = node
        self._reply = reply
        self._spawn = spawn

    async def handle(self, msg: Msg) -> None:
        """The ``ctl.*`` subscription's callback: answer in a task of its own."""
        self._spawn(self._answer(msg))

    async def _answer(self, msg: Msg) -> None:
        try:
            request = codec.decode_control_request(msg.data)
        except codec.BusDecodeError as exc:
            reply = ControlReply(status=400, code=ErrorCode.INVALID_REQUEST, message=str(exc))
        else:
            reply = await self.answer(request)
        if msg.reply:
            await self._reply(msg.reply, codec.encode(reply))

    async def answer(self, request: ControlRequest) -> ControlReply:
        match request:
            case CancelJob(job_id=job_id):
                found = self._node.cancel_job(job_id)
                return ControlReply(status=200 if found else 404,
                                    message="cancelled" if found else f"job '{job_id}' not running")
            case LoadRequest():
                return await self._load(request)
            case UnloadRequest():
                return await self._unload(request)
            case TokenizeRequest():
                return await self._tokenize(request)
            case DrainRequest():
                await self._node.drain()
                return ControlReply(status=200, message="draining")
            case PinRequest():
                return await self._pin(request)
            case _:
                assert_never(request)

    async def _load(self, request: LoadRequest) -> ControlReply:
        engine = self._node.engine_for(request.harness)
        if isinstance(engine, str):
            return ControlReply(status=400, code=ErrorCode.LOAD_FAILED, message=engine)
        spec = ModelSpec(source=request.model_id, quant=request.quant, pinned=request.pinned,
                         tensor_parallel=request.tensor_parallel, harness=request.harness)
        try:
            model_id = await self._node.load(spec, memory_mb=request.memory_mb)
        except AlreadyLoadedError as exc:
            return self._loaded(exc.model_id, str(exc))
        except InsufficientMemoryError as exc:
            return ControlReply(status=503, code=ErrorCode.INSUFFICIENT_MEMORY, message=str(exc),
                                memory_mb=exc.need_mb)
        except PreflightError as exc:
            return ControlReply(status=422, code=ErrorCode.PREFLIGHT_FAILED, message=str(exc),
                                preflight=exc.failure)
        except UnsupportedArchitectureError as exc:
            return ControlReply(status=422, code=ErrorCode.UNSUPPORTED_ARCHITECTURE,
                                message=str(exc))
        except NeuronError as exc:
            return ControlReply(status=400, code=ErrorCode.LOAD_FAILED, message=str(exc))
        return self._loaded(model_id, "loaded")

    def _loaded(self, model_id: str, message: str) -> ControlReply:
        slot = self._node.residency.get(model_id)
        return ControlReply(status=200, model=model_id, message=message,
                            memory_mb=slot.memory_mb if slot is not None else None)

    async def _unload(self, request: UnloadRequest) -> ControlReply:
        model_id = request.model_id
        slot = self._node.residency.get(model_id)
        if slot is None:
            return ControlReply(status=404, code=ErrorCode.NOT_FOUND, model=model_id,
                                message=f"model '{model_id}' not found on any harness")
        if slot.status != "loaded":
            return ControlReply(status=409, code=ErrorCode.MODEL_NOT_LOADED, model=model_id,
                                message=f"model '{model_id}' is still loading")
        if request.evict and slot.pinned:
            return ControlReply(status=409, code=ErrorCode.PINNED, model=model_id,
                                message=f"model '{model_id}' is pinned on this node")
        await self._node.unload(model_id, evict=request.evict)
        return ControlReply(status=200, model=model_id,
                            message="evicted" if request.evict else "unloaded")

    async def _pin(self, request: PinRequest) -> ControlReply:
        slot = self._node.residency.get(request.model_id)
        if slot is None:
            return ControlReply(status=404, code=ErrorCode.NOT_FOUND, model=request.model_id,
                                message=f"model '{request.model_id}' not found on any harness")
        slot.pinned = request.pinned
        log.info("model %s %s", request.model_id, "pinned" if request.pinned else "unpinned")
        await self._node.state_changed()
        return ControlReply(status=200, model=request.model_id,
                            message="pinned" if request.pinned else "unpinned")

    async def _tokenize(self, request: TokenizeRequest) -> ControlReply:
        slot = self._node.residency.get(request.model)
        if slot is None or slot.model is None:
            return ControlReply(status=404, code=ErrorCode.MODEL_NOT_LOADED, model=request.model,
                                message=f"model '{request.model}' not loaded on this neuron")
        try:
            prompt = await asyncio.to_thread(
                functools.partial(prepare_prompt, slot.model, messages=request.messages,
                                  prompt=request.prompt, tools=request.tools,
                                  chat_template_kwargs=request.chat_template_kwargs)
            )
        except NeuronError as exc:
            return ControlReply(status=400, code=ErrorCode.TEMPLATE_ERROR, message=str(exc))
        return ControlReply(status=200, model=request.model, tokens=len(prompt.ids))
