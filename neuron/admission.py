"""Admission: whether a job may run on this neuron now, and the counts of who is running.

One owner for the numbers the heartbeat reports and the limits they are checked against:

- the neuron: at most ``max_jobs`` jobs in progress (preparing, waiting or generating);
- each model: at most ``max_waiting`` jobs waiting for a place in its batch (the engine runs up
  to ``max_batch`` at once; `ModelSlot.running` / `ModelSlot.waiting` are kept here);
- the model's accelerator: at least ``min_free_vram_mb`` free (REFERENCE §6.3; skipped when the
  reading is 0, as on the CPU).

A refusal is retryable (`Refusal`): the gateway sends the job to another replica. A `Ticket`
follows an admitted job until it ends, whatever way it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from bus_schema.errors import ErrorCode
from neuron.devices import accelerator_free_mb
from neuron.residency import ModelSlot
from neuron.settings import NeuronSettings


@dataclass(frozen=True)
class Refusal:
    """Why a job may not run now (always retryable elsewhere)."""

    code: ErrorCode
    message: str


class Ticket:
    """An admitted job's place: waiting for the model's batch, then running, then gone."""

    def __init__(self, admission: Admission, slot: ModelSlot) -> None:
        self._admission = admission
        self._slot = slot
        self._state = "waiting"
        slot.waiting += 1

    def started(self) -> None:
        """The engine took the job into its batch."""
        if self._state == "waiting":
            self._state = "running"
            self._slot.waiting -= 1
            self._slot.running += 1

    def close(self) -> None:
        """The job ended (idempotent)."""
        match self._state:
            case "waiting":
                self._slot.waiting -= 1
            case "running":
                self._slot.running -= 1
            case _:
                return
        self._state = "closed"
        self._admission._release()  # the ticket's own admission


class Admission:
    """The neuron's admission rules and counts (see the module docstring). Event-loop only."""

    def __init__(
        self,
        settings: NeuronSettings,
        *,
        free_memory_mb: Callable[[str], int] = accelerator_free_mb,
    ) -> None:
        """``free_memory_mb`` reads a device's free memory (0: unknown, never refuses)."""
        self._settings = settings
        self._free_memory_mb = free_memory_mb
        self._admitted = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        """Jobs in progress on this neuron."""
        return self._admitted

    def admit(self, slot: ModelSlot) -> Ticket | Refusal:
        """A ticket for a job on ``slot``'s (loaded) model, or why not now."""
        s = self._settings
        if self._admitted >= s.max_jobs:
            return Refusal(ErrorCode.OVERLOADED,
                           f"neuron '{s.name}' is at its limit of {s.max_jobs} jobs")
        if slot.waiting >= s.max_waiting:
            return Refusal(ErrorCode.OVERLOADED,
                           f"model '{slot.model_id}' on neuron '{s.name}' already has "
                           f"{slot.waiting} jobs waiting for a place in its batch")
        device = slot.model.info.device if slot.model is not None else "cpu"
        low = self.low_memory(device)
        if low is not None:
            return Refusal(ErrorCode.INSUFFICIENT_MEMORY, low)
        self._admitted += 1
        self._idle.clear()
        return Ticket(self, slot)

    def low_memory(self, device: str) -> str | None:
        """Why ``device`` is too full to start a job (REFERENCE §6.3), or None."""
        free = self._free_memory_mb(device)
        required = self._settings.min_free_vram_mb
        if free and free < required:
            return f"insufficient free VRAM: {free} MiB free, need at least {required} MiB"
        return None

    async def wait_idle(self, limit_s: float) -> bool:
        """Wait until no job is in progress; False if ``limit_s`` passed first."""
        try:
            async with asyncio.timeout(limit_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _release(self) -> None:
        self._admitted -= 1
        if not self._admitted:
            self._idle.set()
