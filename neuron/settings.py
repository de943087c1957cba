"""Neuron settings: one frozen dataclass, built by `neuron.cli` from flags and ``NEURON_*`` env
variables and passed explicitly to the worker."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from bus_schema.connection import parse_nats_urls
from bus_schema.subjects import DEFAULT_ROOT, check_node_name, check_root


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model to make resident at start-up."""

    source: str
    """A local path (``.gguf`` file or model folder) or a hub id ``[scheme:]org/name``."""
    served_name: str | None = None
    """Canonical id to serve it under (default: the hub id, or ``local/<name>`` for paths)."""
    quant: str | None = None
    pinned: bool = False


def default_node_name() -> str:
    """The short host name, made safe as a subject token."""
    name = socket.gethostname().split(".")[0] or "neuron"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


@dataclass(frozen=True, kw_only=True)
class NeuronSettings:
    name: str = field(default_factory=default_node_name)
    """Node name on the bus (a subject token)."""
    nats_url: str = "nats://127.0.0.1:4222"
    root: str = DEFAULT_ROOT
    """Subject root; tests use their own."""
    models: tuple[ModelSpec, ...] = ()
    device: str = "auto"
    """``auto`` (first CUDA device, else CPU), ``cpu`` or ``cuda:N``."""
    dtype: str = "auto"
    """``auto`` (bf16), ``bfloat16``, ``float16`` or ``float32``."""
    hf_cache: Path | None = None
    heartbeat_interval_s: float = 1.0
    max_jobs: int = 16
    """Admission limit: jobs running or waiting for the model's thread."""
    max_prompt_tokens: int = 16384
    prefill_chunk_tokens: int = 512
    default_repetition_penalty: float = 1.1
    """Used when a job does not set one (REFERENCE §6.2)."""
    repetition_window: int = 64
    chunk_max_tokens: int = 16
    """Coalesce at most this many tokens into one TokenChunk."""
    drain_timeout_s: float = 30.0
    memory_budget_mb: int | None = None
    """Per device: how much the neuron may fill with models; None: half of the device."""

    def __post_init__(self) -> None:
        check_node_name(self.name)
        check_root(self.root)
        parse_nats_urls(self.nats_url)
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat interval must be positive")
        if self.max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        if self.max_prompt_tokens < 1 or self.prefill_chunk_tokens < 1:
            raise ValueError("token limits must be positive")
