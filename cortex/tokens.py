"""Exact prompt token counts without generating (``/v1/messages/count_tokens``, REFERENCE §8.7).

A count is a ``ctl.tokenize`` request to a node that holds the model: it renders and tokenises the
prompt with the same code a job uses, so the count equals the job's ``input_tokens``. Counts are
cached by request (clients such as Claude Code send bursts of identical ones), and concurrent
identical requests share one round trip. It never triggers a load.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from typing import Final

from bus_schema import codec
from bus_schema.errors import ErrorCode
from bus_schema.messages import TokenizeRequest
from cortex.bus import BusError, GatewayBus
from cortex.dispatch import JobDraft
from cortex.errors import ApiError, Reason
from cortex.routing import check_routable

log = logging.getLogger(__name__)

_TIMEOUT_S: Final = 10.0


class TokenCounter:
    """Counts prompt tokens over the bus, with a bounded cache and single flight."""

    def __init__(self, bus: GatewayBus, *, capacity: int = 4096) -> None:
        self._bus = bus
        self._capacity = capacity
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[int]] = {}

    async def count(self, draft: JobDraft) -> int:
        """The prompt size a job for ``draft`` would report as ``prompt_tokens``.

        Raises:
            ApiError: unknown model, nobody serving it, or the template refused the messages.
        """
        model = self._bus.settings.catalogue.resolve(draft.model)
        request = TokenizeRequest(model=model, messages=draft.messages, prompt=draft.prompt,
                                  chat_template_kwargs=draft.chat_template_kwargs,
                                  tools=draft.tools)
        payload = codec.encode(request)
        key = hashlib.blake2b(payload, digest_size=16).digest()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        pending = self._inflight.get(key)
        if pending is not None:
            with contextlib.suppress(asyncio.CancelledError):
                return await asyncio.shield(pending)
            if not pending.cancelled():
                raise asyncio.CancelledError  # we were cancelled ourselves
            return await self.count(draft)  # the first asker went away: ask again
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            tokens = await self._ask(request)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody else must log it
            raise
        finally:
            del self._inflight[key]
        future.set_result(tokens)
        self._cache[key] = tokens
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return tokens

    async def _ask(self, request: TokenizeRequest) -> int:
        await check_routable(self._bus, request.model)
        node = self._bus.fleet.routable(request.model)[0].node
        try:
            reply = await self._bus.control(node, "tokenize", request, timeout_s=_TIMEOUT_S)
        except BusError as exc:
            raise ApiError(Reason.NO_WORKER, f"counting tokens failed: {exc}") from None
        if reply.status == 200 and reply.tokens is not None:
            return reply.tokens
        log.info("tokenize on %s refused: %s %s", node, reply.code, reply.message)
        match reply.code:
            case ErrorCode.TEMPLATE_ERROR:
                raise ApiError(Reason.TEMPLATE_ERROR, reply.message)
            case ErrorCode.MODEL_NOT_LOADED | None:
                raise ApiError(Reason.MODEL_NOT_LOADED, reply.message or "tokenize failed")
            case _:
                raise ApiError(Reason(reply.code.value), reply.message)
