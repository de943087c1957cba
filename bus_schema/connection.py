"""How to reach the bus: NATS server URLs and credentials, as gateways and neurons are given them.

Operators write one URL (``nats://neuron:secret@nats-a:4222``) or a comma-separated list of a
cluster's members. nats-py applies credentials embedded in a URL to that server only, so after a
failover to another member the reconnect would be refused; `parse_nats_urls` lifts the
credentials out so they can be passed once, for every server.

Secrets never reach a log line or an error message: `NatsEndpoint.redacted` and `redact_urls`
are what may be shown. A server with a certificate from a private CA is trusted through a CA file
(``--nats-ca`` / ``[nats] ca_file``), given to `NatsEndpoint.connect_options`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict
from urllib.parse import unquote, urlsplit, urlunsplit

_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})


@dataclass(frozen=True)
class NatsEndpoint:
    """Server URLs without credentials, and the credentials that apply to all of them."""

    servers: tuple[str, ...]
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """The servers for logs (never the secrets)."""
        return ",".join(self.servers)

    def connect_options(self, *, ca_file: Path | None = None) -> ConnectOptions:
        """Keyword arguments for ``nats.connect``, the same for gateways and neurons.

        ``ca_file`` (PEM) is the only authority trusted for the servers' TLS certificates; without
        it nats-py trusts the system's authorities when a server requires TLS. It is read here,
        once per connection (a few KB, as nats-py's own default context would be).

        Raises:
            OSError: ``ca_file`` cannot be read.
            ssl.SSLError: it holds no usable certificate.
        """
        return ConnectOptions(
            servers=list(self.servers),
            user=self.user,
            password=self.password,
            token=self.token,
            tls=tls_context(ca_file) if ca_file is not None else None,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            ping_interval=5,
            max_outstanding_pings=3,
        )


def tls_context(ca_file: Path) -> ssl.SSLContext:
    """A client TLS context that verifies servers (and their host names) against ``ca_file``.

    Raises:
        OSError: the file cannot be read.
        ssl.SSLError: it holds no usable certificate.
    """
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))


class ConnectOptions(TypedDict):
    """How every Cortex process connects. nats-py's defaults give up reconnecting after about two
    minutes and notice a dead server only after about four: reconnect forever, ping every 5 s."""

    servers: list[str]
    user: str | None
    password: str | None
    token: str | None
    tls: ssl.SSLContext | None
    max_reconnect_attempts: int
    reconnect_time_wait: float
    ping_interval: int
    max_outstanding_pings: int


def redact_urls(value: str) -> str:
    """``value`` (one NATS URL or a comma-separated list) with every password and token replaced
    by ``***``, for logs and error messages: ``nats://neuron:***@bus:4222``."""
    items = []
    for item in value.split(","):
        scheme, sep, rest = item.rpartition("://")
        userinfo, at, host = rest.rpartition("@")
        if at:
            user, colon, _ = userinfo.partition(":")
            rest = f"{user}:***@{host}" if colon else f"***@{host}"
        items.append(f"{scheme}{sep}{rest}")
    return ",".join(items)


def parse_nats_urls(value: str) -> NatsEndpoint:
    """Parse ``nats://[user:password@|token@]host:port[,more...]``.

    Raises:
        ValueError: empty, a bad scheme, or different credentials on different URLs (the
            message shows the URLs without their secrets).
    """
    shown = redact_urls(value)
    servers: list[str] = []
    credentials: set[tuple[str | None, str | None]] = set()
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        if "://" not in item:
            item = f"nats://{item}"
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError:  # urllib's message may quote a piece of a mistyped password
            raise ValueError(f"invalid NATS URL {shown!r}") from None
        if parts.scheme not in _SCHEMES:
            raise ValueError(f"unsupported NATS URL scheme '{parts.scheme}' in {shown!r}")
        if not parts.hostname:
            raise ValueError(f"NATS URL without a host: {shown!r}")
        if parts.username is not None:
            credentials.add(
                (unquote(parts.username),
                 unquote(parts.password) if parts.password is not None else None)
            )
        netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
        if ":" in parts.hostname:  # IPv6 literal
            netloc = f"[{parts.hostname}]" + (f":{port}" if port else "")
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
