"""The fleet routes every client shares: ``/health`` (and ``/``), ``/v1/models``,
``/v1/models/{id}``. The inference routes live with their dialect (`cortex.dialects`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Final

import msgspec
from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from cortex.api import Health, ModelCard, ModelList, ModelLocation, NodeCounts
from cortex.auth import permits, require_model
from cortex.context import Gateway
from cortex.errors import model_not_found
from cortex.fleet import Location
from cortex.http import AnyRequest, json_response

log = logging.getLogger(__name__)

#: A stable ``created`` for every model card (REFERENCE §4: stable, not "now").
_CREATED: Final = 1735689600  # 2025-01-01T00:00:00Z
_CREATED_AT: Final = datetime.fromtimestamp(_CREATED, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
_encoder: Final = msgspec.json.Encoder()


# ------------------------------------------------------------------ fleet routes


def _location(loc: Location) -> ModelLocation:
    return ModelLocation(node=loc.node, status=loc.status if loc.healthy else "unloaded",
                         vram_estimate_mb=None)


def model_cards(gw: Gateway) -> dict[str, ModelCard]:
    """REFERENCE §4's merge of one fleet snapshot, by id: (1) every catalogue profile, unloaded,
    with the healthy nodes it is feasible on; (2) every model a node reports, where it is (a stale
    node's copy shows as ``unloaded``); (3) cold loads this gateway started, as ``loading``;
    (4) exact aliases, each a copy of its target's card (never replacing a real id)."""
    fleet, catalogue = gw.bus.fleet, gw.settings.catalogue
    cards: dict[str, ModelCard] = {}
    for model, entry in catalogue.profiles.items():
        cards[model] = ModelCard(
            id=model, created=_CREATED, created_at=_CREATED_AT, owned_by="cortex",
            display_name=model, loaded=False, feasible_on=gw.fleet.feasible_on(entry),
            locations=[], vram_estimate_mb=entry.vram_mb,
        )
    for model in fleet.model_ids():
        locations = fleet.locations(model)
        report = fleet.model(model)
        base = cards.get(model) or ModelCard(
            id=model, created=_CREATED, created_at=_CREATED_AT, owned_by="cortex",
            display_name=model, loaded=False, feasible_on=[], locations=[],
        )
        cards[model] = msgspec.structs.replace(
            base,
            loaded=any(loc.status == "loaded" and loc.healthy for loc in locations),
            locations=[_location(loc) for loc in locations],
            max_model_len=report.context_length if report else None,
            load_progress=report.load_progress if report else None,
        )
    for model, node in gw.fleet.loading().items():
        card = cards.get(model)
        if card is None or node is None or any(loc.node == node for loc in card.locations):
            continue
        cards[model] = msgspec.structs.replace(card, locations=[
            *card.locations, ModelLocation(node=node, status="loading", vram_estimate_mb=None)])
    for alias, target in catalogue.aliases.exact.items():
        if alias in cards:
            continue
        card = cards.get(target)
        if card is None:
            _warn_dead_alias(alias, target)
            continue
        cards[alias] = msgspec.structs.replace(card, id=alias, display_name=alias)
    return cards


_dead_aliases: set[tuple[str, str]] = set()


def _warn_dead_alias(alias: str, target: str) -> None:
    if (alias, target) not in _dead_aliases and len(_dead_aliases) < 1024:
        _dead_aliases.add((alias, target))
        log.warning("alias '%s' points at '%s', which is neither catalogued nor served", alias,
                    target)


def handlers(gw: Gateway) -> list[HTTPRouteHandler]:
    """The fleet routes, working with ``gw``."""
    bus = gw.bus

    @get(["/health", "/"], sync_to_thread=False)
    def health() -> Response[bytes]:
        """Always 200 (REFERENCE §4); ``degraded`` with no healthy node or no bus."""
        healthy, total = bus.fleet.health()
        connected = bus.connected
        return json_response(_encoder.encode(Health(
            status="ok" if healthy and connected else "degraded",
            nodes=NodeCounts(healthy, total), bus="connected" if connected else "down",
        )))

    @get("/ready", sync_to_thread=False)
    def ready() -> Response[bytes]:
        """For load balancers and orchestrators: 503 while the bus is down."""
        connected = bus.connected
        return json_response(_encoder.encode({"ready": connected}),
                             status=200 if connected else 503)

    @get("/v1/models", sync_to_thread=False)
    def list_models(request: AnyRequest) -> Response[bytes]:
        resolve = gw.settings.catalogue.resolve
        cards = [card for name, card in sorted(model_cards(gw).items())
                 if permits(request, resolve(name))]
        return json_response(_encoder.encode(ModelList(
            data=cards,
            has_more=False,
            first_id=cards[0].id if cards else None,
            last_id=cards[-1].id if cards else None,
        )))

    @get("/v1/models/{model_id:path}", sync_to_thread=False)
    def get_model(request: AnyRequest, model_id: FromPath[str]) -> Response[bytes]:
        asked = model_id.lstrip("/")
        require_model(request, gw.settings.catalogue.resolve(asked))
        cards = model_cards(gw)
        card = cards.get(asked) or cards.get(gw.settings.catalogue.resolve(asked))
        if card is None:
            raise model_not_found(asked)
        return json_response(_encoder.encode(
            msgspec.structs.replace(card, id=asked, display_name=asked)))

    return [health, ready, list_models, get_model]
