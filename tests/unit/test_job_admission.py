"""Job admission (`neuron.admission`): the neuron's job limit, each model's waiting limit, and
low accelerator memory (REFERENCE §6.3, ``NEURON_MIN_FREE_VRAM_MB``); a ticket keeps the model's
running / waiting counts and frees its place however the job ends."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from bus_schema.errors import ErrorCode
from neuron.admission import Admission, Refusal, Ticket
from neuron.devices import accelerator_free_mb
from neuron.residency import ModelSlot
from neuron.settings import ModelSpec, NeuronSettings


def _admission(free: int = 0, **settings: int) -> Admission:
    return Admission(NeuronSettings(min_free_vram_mb=1500, **settings),  # type: ignore[arg-type]
                     free_memory_mb=lambda _device: free)


@pytest.fixture
def slot() -> ModelSlot:
    return ModelSlot(model_id="m", spec=ModelSpec(source="m"), executor=ThreadPoolExecutor(1))


def test_a_job_is_refused_below_the_free_memory_floor() -> None:
    assert _admission(1000).low_memory("cuda:0") == (
        "insufficient free VRAM: 1000 MiB free, need at least 1500 MiB")


def test_enough_memory_or_no_reading_admits() -> None:
    assert _admission(1500).low_memory("cuda:0") is None
    assert _admission(0).low_memory("cuda:0") is None  # unknown: never refuses


def test_the_cpu_has_no_reading() -> None:
    assert accelerator_free_mb("cpu") == 0


def test_a_ticket_counts_waiting_then_running_and_frees_its_place_once(slot: ModelSlot) -> None:
    admission = _admission()
    ticket = admission.admit(slot)
    assert isinstance(ticket, Ticket)
    assert (admission.running, slot.waiting, slot.running) == (1, 1, 0)
    ticket.started()
    ticket.started()
    assert (slot.waiting, slot.running) == (0, 1)
    ticket.close()
    ticket.close()
    assert (admission.running, slot.waiting, slot.running) == (0, 0, 0)


def test_a_job_that_never_started_leaves_no_count_behind(slot: ModelSlot) -> None:
    admission = _admission()
    ticket = admission.admit(slot)
    assert isinstance(ticket, Ticket)
    ticket.close()
    assert (admission.running, slot.waiting, slot.running) == (0, 0, 0)


def test_the_neuron_limit_and_the_model_waiting_limit_refuse_as_busy(slot: ModelSlot) -> None:
    admission = _admission(max_jobs=3, max_waiting=2)
    first, second = admission.admit(slot), admission.admit(slot)
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    refused = admission.admit(slot)
    assert isinstance(refused, Refusal) and refused.code is ErrorCode.OVERLOADED
    assert "2 jobs waiting" in refused.message
    first.started()  # one place in the batch: room to wait again
    third = admission.admit(slot)
    assert isinstance(third, Ticket)
    refused = admission.admit(slot)
    assert isinstance(refused, Refusal) and "limit of 3 jobs" in refused.message
    for ticket in (first, second, third):
        ticket.close()
    assert admission.running == 0


async def test_wait_idle_returns_when_the_last_job_ends(slot: ModelSlot) -> None:
    admission = _admission()
    assert await admission.wait_idle(0.01)
    ticket = admission.admit(slot)
    assert isinstance(ticket, Ticket)
    assert not await admission.wait_idle(0.01)
    ticket.close()
    assert await admission.wait_idle(0.01)
