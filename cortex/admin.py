"""Operator routes (``cortex models/load/unload/pin/status``): the fleet's nodes with their memory,
and model lifecycle actions carried out by the fleet manager. Errors come in OpenAI's shape.

These routes change what the fleet holds: they need an API key like every route (`cortex.auth`),
and a key limited to some models may act only on those.
"""

from __future__ import annotations

import time
from typing import Final

import msgspec
from litestar import Response, Router, get, post
from litestar.handlers import HTTPRouteHandler

from bus_schema.messages import Device, ModelId, NodeName
from cortex.auth import permits, require_model
from cortex.context import Gateway
from cortex.http import AnyRequest, decode_body, json_body, json_response

_encoder: Final = msgspec.json.Encoder()


class ModelAction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: ModelId
    node: NodeName | None = None
    """None: placement chooses (load) or every node holding it (unload, pin)."""
    pinned: bool = True
    """For pin: false unpins."""


_action: Final = msgspec.json.Decoder(ModelAction)


class FleetModel(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str
    memory_mb: int | None
    pinned: bool
    jobs_running: int
    last_used_at: float | None


class FleetNode(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    healthy: bool
    draining: bool
    last_seen_s: float
    evictions: int
    devices: list[Device]
    models: list[FleetModel]


class Fleet(msgspec.Struct, frozen=True, kw_only=True):
    nodes: list[FleetNode]


def handlers(gw: Gateway) -> list[HTTPRouteHandler | Router]:
    """The operator routes under ``/admin``, working with ``gw``."""
    fleet = gw.bus.fleet

    async def model_action(request: AnyRequest) -> ModelAction:
        """The body of a model action, for a key that may use that model."""
        action = decode_body(await json_body(request), _action)
        require_model(request, gw.settings.catalogue.resolve(action.model))
        return action

    @get("/fleet", sync_to_thread=False)
    def nodes(request: AnyRequest) -> Response[bytes]:
        """Every node; a key limited to some models sees only those among each node's models
        (as in ``/v1/models``)."""
        now = time.monotonic()
        return json_response(_encoder.encode(Fleet(nodes=[
            FleetNode(
                name=n.name, healthy=fleet.is_healthy(n.name), draining=n.draining,
                last_seen_s=round(now - n.received_at, 3), evictions=gw.fleet.evictions(n.name),
                devices=list(n.heartbeat.devices),
                models=[FleetModel(id=m.id, status=m.status, memory_mb=m.memory_mb,
                                   pinned=m.pinned, jobs_running=m.jobs_running,
                                   last_used_at=m.last_used_at)
                        for _, m in sorted(n.models.items()) if permits(request, m.id)],
            )
            for n in fleet.nodes()
        ])))

    @post("/models/load", status_code=200)
    async def load(request: AnyRequest) -> Response[bytes]:
        action = await model_action(request)
        node = await gw.fleet.load(action.model, action.node)
        return json_response(_encoder.encode(
            {"model": gw.settings.catalogue.resolve(action.model), "node": node,
             "status": "loaded"}))

    @post("/models/unload", status_code=200)
    async def unload(request: AnyRequest) -> Response[bytes]:
        action = await model_action(request)
        done = await gw.fleet.unload(action.model, action.node)
        return json_response(_encoder.encode(
            {"model": gw.settings.catalogue.resolve(action.model), "nodes": done,
             "status": "unloaded"}))

    @post("/models/pin", status_code=200)
    async def pin(request: AnyRequest) -> Response[bytes]:
        action = await model_action(request)
        done = await gw.fleet.pin(action.model, action.node, pinned=action.pinned)
        return json_response(_encoder.encode(
            {"model": gw.settings.catalogue.resolve(action.model), "nodes": done,
             "pinned": action.pinned}))

    return [Router(path="/admin", route_handlers=[nodes, load, unload, pin])]
