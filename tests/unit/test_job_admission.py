"""Job admission on low accelerator memory (REFERENCE §6.3, ``NEURON_MIN_FREE_VRAM_MB``)."""

from __future__ import annotations

from neuron.devices import accelerator_free_mb
from neuron.runner import JobRunner
from neuron.settings import NeuronSettings


def _runner(free: int) -> JobRunner:
    return JobRunner(NeuronSettings(min_free_vram_mb=1500), free_memory_mb=lambda _device: free)


def test_a_job_is_refused_below_the_free_memory_floor() -> None:
    assert _runner(1000)._low_memory("cuda:0") == (
        "insufficient free VRAM: 1000 MiB free, need at least 1500 MiB")


def test_enough_memory_or_no_reading_admits() -> None:
    assert _runner(1500)._low_memory("cuda:0") is None
    assert _runner(0)._low_memory("cuda:0") is None  # unknown: never refuses


def test_the_cpu_has_no_reading() -> None:
    assert accelerator_free_mb("cpu") == 0
