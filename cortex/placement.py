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
    return roomiest(devices, models)[1]


def roomiest(devices: Sequence[Device], models: Sequence[ResidentModel]) -> tuple[int | None, int]:
    """(index, room) of a node's roomiest compute device; (None, 0) without devices."""
    rooms = [(device_room_mb(d, models), -d.index, d.index) for d in compute_devices(devices)]
    if not rooms:
        return None, 0
    room, _, index = max(rooms)
    return index, room


def on_device(model: ResidentModel, index: int | None) -> bool:
    """Whether evicting ``model`` frees memory on device ``index`` (unknown devices: yes)."""
    return index is None or not model.devices or index in model.devices


def rank(candidates: Sequence[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: (not c.pinned, not c.fits_free,
                                             not c.fits_after_evict, -c.free_mb, c.node))
