"""How to reach the bus: NATS server URLs and credentials, as gateways and neurons are given them.

Operators write one URL (``nats://neuron:secret@nats-a:4222``) or a comma-separated list of a
cluster's members. nats-py applies credentials embedded in a URL to that server only, so after a
failover to another member the reconnect would be refused; `parse_nats_urls` lifts the
credentials out so they can be passed once, for every server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict
from urllib.parse import unquote, urlsplit, urlunsplit

_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})


@dataclass(frozen=True)
class NatsEndpoint:
    """Server URLs without credentials, and the credentials that apply to all of them."""

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def redacted(self) -> str:
        """The servers for logs (never the secrets)."""
        return ",".join(self.servers)

    def connect_options(self) -> ConnectOptions:
        """Keyword arguments for ``nats.connect``, the same for gateways and neurons."""
        return ConnectOptions(
            servers=list(self.servers),
            user=self.user,
            password=self.password,
            token=self.token,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            ping_interval=5,
            max_outstanding_pings=3,
        )


class ConnectOptions(TypedDict):
    """How every Cortex process connects. nats-py's defaults give up reconnecting after about two
    minutes and notice a dead server only after about four: reconnect forever, ping every 5 s."""

    servers: list[str]
    user: str | None
    password: str | None
    token: str | None
    max_reconnect_attempts: int
    reconnect_time_wait: float
    ping_interval: int
    max_outstanding_pings: int


def parse_nats_urls(value: str) -> NatsEndpoint:
    """Parse ``nats://[user:password@|token@]host:port[,more...]``.

    Raises:
        ValueError: empty, a bad scheme, or different credentials on different URLs.
    """
    servers: list[str] = []
    credentials: set[tuple[str | None, str | None]] = set()
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        if "://" not in item:
            item = f"nats://{item}"
        parts = urlsplit(item)
        if parts.scheme not in _SCHEMES:
            raise ValueError(f"unsupported NATS URL scheme '{parts.scheme}' in {value!r}")
        if not parts.hostname:
            raise ValueError(f"NATS URL without a host: {value!r}")
        if parts.username is not None:
            credentials.add(
                (unquote(parts.username),
                 unquote(parts.password) if parts.password is not None else None)
            )
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # IPv6 literal
            netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        servers.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    if not servers:
        raise ValueError("no NATS server URL given")
    if len(credentials) > 1:
        raise ValueError("the NATS URLs carry different credentials; use the same on every URL")
    if not credentials:
        return NatsEndpoint(servers=tuple(servers))
    user, password = credentials.pop()
    if password is None:
        return NatsEndpoint(servers=tuple(servers), token=user)
    return NatsEndpoint(servers=tuple(servers), user=user, password=password)
