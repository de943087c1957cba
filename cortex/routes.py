"""The fleet routes every client shares: ``/health`` (and ``/``), ``/v1/models``,
``/v1/models/{id}``. The inference routes live with their dialect (`cortex.dialects`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import msgspec
from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from cortex.api import Health, ModelCard, ModelList, ModelLocation, NodeCounts
from cortex.bus import GatewayBus
from cortex.errors import model_not_found
from cortex.http import json_response

#: A stable ``created`` for every model card (REFERENCE §4: stable, not "now").
_CREATED: Final = 1735689600  # 2025-01-01T00:00:00Z
_CREATED_AT: Final = datetime.fromtimestamp(_CREATED, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
_encoder: Final = msgspec.json.Encoder()


# ------------------------------------------------------------------ fleet routes


def _card(bus: GatewayBus, model: str, *, shown_as: str | None = None) -> ModelCard:
    """The card of ``model``; ``shown_as`` names an alias that mirrors it."""
    locations = bus.fleet.locations(model)
    report = bus.fleet.model(model)
    return ModelCard(
        id=shown_as or model,
        created=_CREATED,
        created_at=_CREATED_AT,
        owned_by="cortex",
        display_name=shown_as or model,
        loaded=any(loc.status == "loaded" and loc.healthy for loc in locations),
        feasible_on=[],
        locations=[
            ModelLocation(
                node=loc.node,
                status=loc.status if loc.healthy else "unloaded",
                vram_estimate_mb=None,
            )
            for loc in locations
        ],
        max_model_len=report.context_length if report else None,
        load_progress=report.load_progress if report else None,
    )


def handlers(bus: GatewayBus) -> list[HTTPRouteHandler]:
    """The fleet routes, working with ``bus``."""

    @get(["/health", "/"], sync_to_thread=False)
    def health() -> Response[bytes]:
        healthy, total = bus.fleet.health()
        return json_response(_encoder.encode(
            Health(status="ok" if healthy else "degraded", nodes=NodeCounts(healthy, total))
        ))

    @get("/v1/models", sync_to_thread=False)
    def list_models() -> Response[bytes]:
        known = bus.fleet.model_ids()
        cards = [_card(bus, model) for model in known]
        served = set(known)
        cards += [_card(bus, target, shown_as=alias)
                  for alias, target in sorted(bus.settings.catalogue.aliases.exact.items())
                  if target in served and alias not in served]
        return json_response(_encoder.encode(ModelList(
            data=cards,
            has_more=False,
            first_id=cards[0].id if cards else None,
            last_id=cards[-1].id if cards else None,
        )))

    @get("/v1/models/{model_id:path}", sync_to_thread=False)
    def get_model(model_id: FromPath[str]) -> Response[bytes]:
        asked = model_id.lstrip("/")
        model = bus.settings.catalogue.resolve(asked)
        if model not in bus.fleet.model_ids():
            raise model_not_found(asked)
        return json_response(_encoder.encode(
            _card(bus, model, shown_as=asked if asked != model else None)))

    return [health, list_models, get_model]
