"""CPU threads by kind of work: the linear layers' matrix products on every core, the rest on one.

A decode step on a CPU is two kinds of work. The matrix products of the linear layers are large
and split evenly over threads. Everything else (norms, rotary embeddings, one attention call per
sequence, sampling) is hundreds of small operations: spread over threads, each pays a fork and a
join, and a thread that the operating system preempts (for the gateway, NATS or the neuron's own
event loop) holds the others at the join. Through the gateway, on SmolLM2-135M with float16
weights on a 2-core AMD EPYC, 16 streams got 98 tokens/s with one thread for everything, 55 with
two for everything, and 116 with two for the products only (one stream: 17, 15 and 24).

So a decoder's linear layers run on `ThreadSplit.matmul` threads and everything else on
`ThreadSplit.other` (one): between two products the second core is free for the event loop, the
gateway and NATS. The thread count belongs to the calling thread (its OpenMP team), so a step
loop changes only its own.

Every other thread of the neuron stays on one thread (`TorchEngine` sets that before loading).
libgomp keeps a pool of workers for each thread that ever ran a parallel region, and once the
pools hold more threads than there are cores its workers stop spinning between regions and sleep
instead: waking them made a product from a step loop thread twice as slow (measured: 476 against
170 µs, 576 x 3072 float16 weights, 3 rows) after the loading thread had used two threads. Two
models that both run steps on one CPU neuron have two pools and meet the same slowdown; one
model per CPU neuron is the fast case.

The CPU kernels (`neuron.engines.torch_cpu_kernels`) take the same split: their products and
the decoding sequences' attention on `matmul` threads, their norms, RoPE and SiLU on the calling
thread.

`matmul` does not change any result: the kernels split a product by output columns, and each
column's sum runs in the same order whatever the thread count (tested).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

import torch

#: The threads everything but the linear layers' matrix products runs on.
OTHER_THREADS: Final = 1


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ThreadSplit:
    """The threads of one decoder's CPU work: `matmul` for the linear layers' matrix products,
    `other` for the rest. ``matmul == other`` (on a GPU, or one core) switches nothing."""

    def __init__(self) -> None:
        self.matmul = OTHER_THREADS
        self.other = OTHER_THREADS

    def configure(self, matmul: int, other: int = OTHER_THREADS) -> None:
        """Set both counts, and the calling thread (the one that loads the model) to ``other``
        threads; a step loop's thread is back on ``other`` after its first `run`."""
        if matmul < 1 or other < 1:
            raise ValueError("thread counts must be at least 1")
        self.matmul, self.other = matmul, other
        torch.set_num_threads(other)

    def run(self, product: Callable[[torch.Tensor], torch.Tensor],
            x: torch.Tensor) -> torch.Tensor:
        """``product(x)`` on `matmul` threads; the calling thread is back on `other` after."""
        if self.matmul == self.other:
            return product(x)
        torch.set_num_threads(self.matmul)
        try:
            return product(x)
        finally:
            torch.set_num_threads(self.other)
