"""Which resident models make room for a cold load (REFERENCE §5.3). Pure rules, no I/O.

- Candidates are a node's loaded models, except those pinned there (never evicted there) and
  those loaded less than ``min_residency_s`` ago (the residency floor: two hot models on a node
  with room for one would otherwise evict each other on every request).
- ``lru`` evicts the least recently used first (never used counts as oldest) and ignores
  priorities. ``priority`` lets a newcomer displace only models of strictly lower priority, the
  lowest first, then by LRU.
- A plan frees enough for the newcomer with at most ``max_victims`` evictions, or evicts nothing:
  emptying a node that still would not fit helps nobody.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Strategy = Literal["lru", "priority"]


@dataclass(frozen=True, kw_only=True)
class Resident:
    """A model resident on the node being considered."""

    model: str
    memory_mb: int
    priority: int
    pinned: bool
    last_used_at: float | None
    loaded_at: float | None


@dataclass(frozen=True, kw_only=True)
class EvictionPlan:
    victims: tuple[str, ...] = ()
    freed_mb: int = 0
    protected_until: float | None = None
    """When the residency floor kept models that would have made room: the earliest moment one of
    them becomes evictable (a Retry-After for the caller)."""
    displaceable_mb: int = 0
    """What every candidate together frees (the newcomer fits after eviction when
    ``free + displaceable >= need``)."""


def candidates(
    residents: Iterable[Resident], *, strategy: Strategy, newcomer_priority: int, now: float,
    min_residency_s: float,
) -> tuple[list[Resident], list[Resident]]:
    """Evictable residents in eviction order, and those the residency floor protects (that the
    strategy would otherwise let go)."""
    order: list[Resident] = []
    protected: list[Resident] = []
    for r in residents:
        if r.pinned:
            continue
        if strategy == "priority" and r.priority >= newcomer_priority:
            continue
        if (r.loaded_at or 0.0) + min_residency_s > now:
            protected.append(r)
            continue
        order.append(r)
    if strategy == "priority":
        order.sort(key=lambda r: (r.priority, r.last_used_at or -math.inf, r.model))
    else:
        order.sort(key=lambda r: (r.last_used_at or -math.inf, r.model))
    return order, protected


def plan(
    residents: Sequence[Resident], *, need_mb: int, free_mb: int, strategy: Strategy,
    newcomer_priority: int, now: float, min_residency_s: float, max_victims: int = 3,
) -> EvictionPlan:
    """The evictions that let ``need_mb`` fit next to ``free_mb``; none when it fits already or
    cannot be made to fit."""
    order, protected = candidates(
        residents, strategy=strategy, newcomer_priority=newcomer_priority, now=now,
        min_residency_s=min_residency_s,
    )
    displaceable = sum(r.memory_mb for r in order)
    protected_until = None
    if protected and free_mb + displaceable + sum(r.memory_mb for r in protected) >= need_mb:
        protected_until = min((r.loaded_at or 0.0) + min_residency_s for r in protected)
    if need_mb <= free_mb:
        return EvictionPlan(displaceable_mb=displaceable)
    victims: list[str] = []
    freed = 0
    for r in order[:max_victims]:
        victims.append(r.model)
        freed += r.memory_mb
        if free_mb + freed >= need_mb:
            return EvictionPlan(victims=tuple(victims), freed_mb=freed,
                                displaceable_mb=displaceable)
    return EvictionPlan(protected_until=protected_until, displaceable_mb=displaceable)
