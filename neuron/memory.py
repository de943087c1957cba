"""Memory accounting: what this neuron may fill with models on its device, and what they take.

Each device gets a budget (``memory_budget_mb`` in ``neuron.toml``; by default half of the
device's total memory, so a CPU-only host keeps room for everything else it runs). A model is
accounted at the larger of the gateway's estimate (the catalogue's ``vram_mb``), the neuron's own
estimate from the weight files, and — once loaded — what its weights really take. A load that does
not fit the budget left, or the device's physical free memory, is refused with
``insufficient_vram`` before anything is read, so the gateway can evict and try again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import msgspec

from bus_schema.messages import Device
from neuron.engines.base import ModelFiles

_MB: Final = 1024 * 1024
#: GGUF weights are dequantised to 16-bit on load: about four times the file for 4-bit quants.
_GGUF_EXPANSION: Final = 4
DEFAULT_BUDGET_FRACTION: Final = 0.5


def default_budget_mb(total_mb: int) -> int:
    """The budget of a device when ``memory_budget_mb`` is not set: half of its memory."""
    return int(total_mb * DEFAULT_BUDGET_FRACTION)


def estimate_mb(files: ModelFiles) -> int:
    """What ``files`` will take once resident (before loading; at least 1 MiB)."""
    size = sum(p.stat().st_size for p in files.weights if p.exists())
    if files.format == "gguf":
        size *= _GGUF_EXPANSION
    return max(1, -(-size // _MB))


def device_index(devices: Iterable[Device], device: str) -> int:
    """The index (in ``devices``) of the torch device string ``cpu`` / ``cuda:N``."""
    listed = tuple(devices)
    kind, _, number = device.partition(":")
    for d in listed:
        if d.kind == kind and (kind == "cpu" or d.index == int(number or 0)):
            return d.index
    return listed[-1].index if listed else 0


@dataclass(frozen=True)
class Admission:
    """A load's place on its device, or why it does not fit."""

    device: int
    need_mb: int
    refusal: str | None = None


class MemoryBook:
    """Budgets per device and the admission rule for loads."""

    def __init__(self, *, budget_mb: int | None) -> None:
        self._budget_mb = budget_mb

    def budget_for(self, device: Device) -> int:
        if self._budget_mb is not None:
            return self._budget_mb
        return default_budget_mb(device.memory_total_mb)

    def admit(
        self, devices: tuple[Device, ...], target: str, need_mb: int, used_mb: dict[int, int]
    ) -> Admission:
        """Whether a model of ``need_mb`` fits on ``target`` given what is accounted already."""
        index = device_index(devices, target)
        device = next((d for d in devices if d.index == index), None)
        if device is None:
            return Admission(index, need_mb)
        budget = self.budget_for(device)
        free = budget - used_mb.get(index, 0)
        if need_mb > free:
            return Admission(index, need_mb, (
                f"insufficient free memory on {device.name}: {max(free, 0)} MiB free of the "
                f"{budget} MiB budget, need {need_mb} MiB"))
        if device.memory_free_mb and need_mb > device.memory_free_mb:
            return Admission(index, need_mb, (
                f"insufficient free memory on {device.name}: {device.memory_free_mb} MiB "
                f"physically free, need {need_mb} MiB"))
        return Admission(index, need_mb)

    def report(self, devices: tuple[Device, ...], used_mb: dict[int, int]) -> tuple[Device, ...]:
        """``devices`` with each one's budget and what the models on it take."""
        return tuple(
            msgspec.structs.replace(d, budget_mb=self.budget_for(d),
                                    models_mb=used_mb.get(d.index, 0))
            for d in devices
        )
