"""Gateway settings: one frozen dataclass built by `cortex.cli` (flags and ``CORTEX_*`` env) and
passed explicitly to `cortex.app.create_app` and `cortex.bus.GatewayBus`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bus_schema.connection import parse_nats_urls
from bus_schema.subjects import DEFAULT_ROOT, check_root
from cortex.auth import ApiKey
from cortex.catalogue import Catalogue


def _gateway_id() -> str:
    return f"gw-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    """Interface to listen on; `cortex.cli` picks 0.0.0.0 by default when API keys are set."""
    port: int = 31313
    nats_url: str | None = field(default=None, repr=False)  # may hold a password
    """None: start the embedded nats-server (see `cortex.embedded_nats`)."""
    nats_ca: Path | None = None
    """PEM file of the CA that signed the NATS servers' TLS certificates; None: the system's."""
    root: str = DEFAULT_ROOT
    gateway_id: str = field(default_factory=_gateway_id)
    """This gateway's name on the bus (its reply inbox prefix)."""
    accept_timeout_s: float = 30.0
    """How long a published job may wait for `JobAccepted`/`JobFailed` from the last replica."""
    replica_accept_timeout_s: float = 5.0
    """How long one replica may take to accept while another could take the job instead."""
    stream_idle_timeout_s: float = 600.0
    """Longest silence inside a stream while its neuron still heartbeats."""
    keepalive_interval_s: float = 10.0
    """SSE keep-alive comment period while a stream is silent."""
    job_deadline_s: float = 1800.0
    """Jobs carry ``now + job_deadline_s`` so a neuron stops even if a cancel is lost."""
    discover_wait_s: float = 0.25
    """At start-up, wait this long for neurons to answer discovery before serving."""
    default_temperature: float = 0.7
    max_body_bytes: int = 8 * 1024 * 1024
    """HTTP body limit; lowered at start-up to what the NATS server accepts."""
    catalogue: Catalogue = field(default_factory=Catalogue)
    """``models.toml``: the profiles this fleet may load, and the aliases (globs allowed)."""
    eviction: Literal["lru", "priority"] = "lru"
    """``[eviction] strategy``: who makes room for a cold load (REFERENCE §5.3)."""
    defrag_after_cycles: int = 50
    """Warn about fragmentation after this many evictions on one node; 0 never warns."""
    min_residency_s: float = 60.0
    """A model loaded more recently than this is not evicted (two hot models cannot thrash)."""
    load_timeout_s: float = 1800.0
    """How long a cold load may take on the neuron."""
    load_queue_depth: int = 64
    """Requests that may wait for one model's cold load; more get 503 with Retry-After."""
    load_wait_s: float = 600.0
    """How long a request waits for a cold load before it gets 503 with Retry-After."""
    allowed_nodes: tuple[str, ...] | None = None
    """``cortex.toml`` ``[[neurons]]``: only these nodes are heard; None hears every node."""
    api_keys: tuple[ApiKey, ...] = ()
    """Keys accepted on every route but ``/health``, ``/ready`` and ``/metrics``
    (`cortex.auth`); empty: every request is accepted."""
    allow_unauthenticated: bool = False
    """The operator's explicit consent to listen beyond loopback without API keys."""

    def __post_init__(self) -> None:
        check_root(self.root)
        if self.nats_url is not None:
            parse_nats_urls(self.nats_url)
        if self.nats_ca is not None and not self.nats_ca.is_file():
            raise ValueError(f"NATS CA file '{self.nats_ca}' does not exist")
        if len({k.key for k in self.api_keys}) != len(self.api_keys):
            raise ValueError("the same API key is configured twice")
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid port {self.port}")
        for name in ("accept_timeout_s", "replica_accept_timeout_s", "stream_idle_timeout_s",
                     "keepalive_interval_s", "job_deadline_s", "load_timeout_s", "load_wait_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
