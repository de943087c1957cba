"""Public HTTP shapes of the fleet routes (`/v1/models`, `/health`), shared by every dialect."""

from __future__ import annotations

from typing import Literal

import msgspec

# ------------------------------------------------------------------ fleet


class ModelLocation(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    status: str
    vram_estimate_mb: int | None = None


class ModelCard(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One entry of ``GET /v1/models``: readable by the OpenAI and Anthropic SDKs alike."""

    id: str
    created: int
    created_at: str
    owned_by: str
    display_name: str
    loaded: bool
    feasible_on: list[str]
    locations: list[ModelLocation]
    object: Literal["model"] = "model"
    type: Literal["model"] = "model"
    max_model_len: int | None = None
    load_progress: float | None = None
    vram_estimate_mb: int | None = None
    """The catalogue's ``vram_mb`` for this model, when it has one."""


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[ModelCard]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"


class NodeCounts(msgspec.Struct, frozen=True):
    healthy: int
    total: int


class Health(msgspec.Struct, frozen=True):
    status: Literal["ok", "degraded"]
    nodes: NodeCounts
    bus: Literal["connected", "down"] = "connected"
    """Ours: whether this gateway is connected to NATS (REFERENCE's fields unchanged)."""
