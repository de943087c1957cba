"""Where a cold load goes (REFERENCE §5.2). Pure rules over the fleet view, no I/O.

Candidates are the healthy nodes where the profile is feasible, ordered by
``(pinned here, fits in free memory, fits after evicting, most free memory, name)``: a model
pinned to a node goes there; otherwise the node that can take it without disturbing anyone, then
the one where evictions can make room, then the roomiest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bus_schema.messages import Device, ResidentModel
from cortex.catalogue import compute_devices


@dataclass(frozen=True, kw_only=True)
class Candidate:
    node: str
    pinned: bool
    fits_free: bool
    fits_after_evict: bool
    free_mb: int


def device_room_mb(device: Device, models: Sequence[ResidentModel]) -> int:
    """What a device can still take: its budget less the models on it, and never more than is
    physically free (when the neuron reports a figure)."""
    if device.budget_mb is None:
        return device.memory_free_mb
    used = sum(m.memory_mb or 0 for m in models if not m.devices or device.index in m.devices)
    room = device.budget_mb - used
    if device.memory_free_mb:
        room = min(room, device.memory_free_mb)
    return max(room, 0)


def free_mb(devices: Sequence[Device], models: Sequence[ResidentModel]) -> int:
    """The most a single model can get on a node (its roomiest compute device)."""
    return max((device_room_mb(d, models) for d in compute_devices(devices)), default=0)


def rank(candidates: Sequence[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: (not c.pinned, not c.fits_free,
                                             not c.fits_after_evict, -c.free_mb, c.node))
