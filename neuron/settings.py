"""Neuron settings: one frozen dataclass, built by `neuron.cli` from ``neuron.toml``
(`neuron.config`), ``NEURON_*`` env variables and flags, and passed explicitly to the worker."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from bus_schema.connection import parse_nats_urls
from bus_schema.subjects import DEFAULT_ROOT, check_node_name, check_root

HF_SCHEME: Final = "huggingface"
HF_ENDPOINT: Final = "https://huggingface.co"
HF_AUTH_ENV: Final = "HF_TOKEN"


@dataclass(frozen=True, kw_only=True)
class Source:
    """Where hub ids of one scheme come from (``[harness.torch.sources.<scheme>]``,
    REFERENCE §2.3): any server speaking the Hugging Face hub protocol."""

    scheme: str
    endpoint: str
    """Base URL of the hub (``https://huggingface.co``)."""
    token: str | None = field(default=None, repr=False)
    """Resolved from ``auth_env`` when the config was loaded; never logged. None: no token."""
    cache_dir: Path | None = None
    """Hub cache directory; None means huggingface-hub's default."""
    auth_env: str | None = None
    """The env variable the token was read from (for messages only)."""


def huggingface_source(cache_dir: Path | None = None) -> Source:
    """The source synthesized when none is configured for ``huggingface`` (no token here:
    huggingface-hub then uses ``$HF_TOKEN`` or its stored login itself)."""
    return Source(scheme=HF_SCHEME, endpoint=HF_ENDPOINT, cache_dir=cache_dir,
                  auth_env=HF_AUTH_ENV)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model to make resident at start-up."""

    source: str
    """A local path (``.gguf`` file or model folder) or a hub id ``[scheme:]org/name``."""
    served_name: str | None = None
    """Canonical id to serve it under (default: the hub id, or ``local/<name>`` for paths)."""
    quant: str | None = None
    pinned: bool = False
    tensor_parallel: int | None = None
    """Devices to split the model over (``default_models.tensor_parallel``); None: the engine's
    choice."""
    devices: tuple[int, ...] = ()
    """Device indexes to place it on; empty: the engine's choice."""
    harness: str = "torch"
    """The engine that runs it (``torch``, ``ctransformers``)."""

    def __post_init__(self) -> None:
        if self.tensor_parallel is not None and self.tensor_parallel < 1:
            raise ValueError("tensor_parallel must be at least 1")
        if any(d < 0 for d in self.devices):
            raise ValueError("device indexes must not be negative")


def default_node_name() -> str:
    """The short host name, made safe as a subject token."""
    name = socket.gethostname().split(".")[0] or "neuron"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


@dataclass(frozen=True, kw_only=True)
class NeuronSettings:
    name: str = field(default_factory=default_node_name)
    """Node name on the bus (a subject token)."""
    nats_url: str = field(default="nats://127.0.0.1:4222", repr=False)  # may hold a password
    root: str = DEFAULT_ROOT
    """Subject root; tests use their own."""
    models: tuple[ModelSpec, ...] = ()
    device: str = "auto"
    """``auto`` (first CUDA device, else CPU), ``cpu`` or ``cuda:N``."""
    dtype: str = "auto"
    """``auto`` (bf16), ``bfloat16``, ``float16`` or ``float32``."""
    hf_cache: Path | None = None
    """Cache of the ``huggingface`` source (legacy knob; ``sources`` is authoritative)."""
    heartbeat_interval_s: float = 1.0
    max_jobs: int = 64
    """Admission limit: jobs running or waiting for the model's thread."""
    max_prompt_tokens: int = 16384
    prefill_chunk_tokens: int | None = None
    """Prompt tokens per forward pass while prefilling; None: by device
    (`neuron.engines.torch_engine.default_prefill_chunk`)."""
    default_repetition_penalty: float = 1.1
    """Used when a job does not set one (REFERENCE §6.2)."""
    repetition_window: int = 64
    chunk_max_tokens: int = 16
    """Coalesce at most this many tokens into one TokenChunk."""
    drain_timeout_s: float = 30.0
    memory_budget_mb: int | None = None
    max_batch: int = 32
    """Sequences one model runs at once (continuous batching); more wait for a place."""
    max_waiting: int = 32
    """Jobs that may wait for a place in one model's batch; more are refused as busy, so the
    gateway tries another replica (`neuron.admission`)."""
    quantize: str = "auto"
    """``auto`` (on a CPU without fast bfloat16: float16 weights where torch has fbgemm, else
    int8), ``none``, ``fp16``, ``int8`` or ``int4``."""
    prefix_cache_mb: int = 256
    """KV cache of finished sequences kept per model for prompts that start the same way
    (``neuron.engines.torch_prefix``); 0: prefixes are shared only between running sequences."""
    native_kernels: bool = True
    """On the CPU, decode attention, norms and (float16 or float32 weights) whole layers in C
    kernels built with the machine's compiler on first use (``neuron.engines.torch_cpu_kernels``;
    torch's where they cannot be built)."""
    torch_threads: int | None = None
    """On the CPU, torch's threads for the linear layers' matrix products; None: every core.
    Everything else runs on one thread (``neuron.engines.torch_threads``)."""
    """Per device: how much the neuron may fill with models; None: half of the device
    (`neuron.config.default_memory_budget_mb`)."""
    min_free_vram_mb: int = 1500
    """Refuse a load (``insufficient_vram``) when a device has less free; skipped when the reading
    is 0 (REFERENCE §2.3, §6.6)."""
    use_chat_template: bool = True
    """False forces ChatML instead of the model's own template."""
    sources: Mapping[str, Source] = field(default_factory=dict, hash=False)
    """Scheme -> source; a missing ``huggingface`` source is synthesized (cache ``hf_cache``)."""
    default_source: str = HF_SCHEME
    """Scheme for bare ``org/name`` ids."""
    harnesses: tuple[str, ...] = ("torch", "ctransformers")
    """Enabled engines."""
    nats_credentials: Path | None = None
    """A NATS ``.creds`` file, if the server wants one."""
    nats_ca: Path | None = None
    """PEM file of the authority that signed the NATS servers' TLS certificates (a private CA);
    None trusts the system's authorities."""

    def __post_init__(self) -> None:
        sources = dict(self.sources)
        sources.setdefault(HF_SCHEME, huggingface_source(self.hf_cache))
        object.__setattr__(self, "sources", MappingProxyType(sources))
        if self.default_source not in sources:
            raise ValueError(
                f"default_source '{self.default_source}' has no source; "
                f"configured: {sorted(sources)}"
            )
        check_node_name(self.name)
        check_root(self.root)
        parse_nats_urls(self.nats_url)
        if self.nats_ca is not None and not self.nats_ca.is_file():
            raise ValueError(f"NATS CA file '{self.nats_ca}' does not exist")
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat interval must be positive")
        if self.max_jobs < 1 or self.max_batch < 1 or self.max_waiting < 1:
            raise ValueError("max_jobs, max_batch and max_waiting must be at least 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads must be at least 1")
        if self.max_prompt_tokens < 1 or (self.prefill_chunk_tokens or 1) < 1:
            raise ValueError("token limits must be positive")
        if self.min_free_vram_mb < 0:
            raise ValueError("min_free_vram_mb must not be negative")
        if self.memory_budget_mb is not None and self.memory_budget_mb < 1:
            raise ValueError("memory_budget_mb must be positive")
