"""Connections under a NATS role that record what the server refuses, and the shipped roles of
ops/nats (accounts.conf with neuron users made from neuron-user.conf.template) on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Final

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from cortex.embedded_nats import EmbeddedNatsServer

REPO: Final = Path(__file__).resolve().parents[2]
OPS_NATS: Final = REPO / "ops" / "nats"
ACCOUNTS: Final = OPS_NATS / "accounts.conf"
NEURON_TEMPLATE: Final = OPS_NATS / "neuron-user.conf.template"
#: The line of accounts.conf below which the neuron users go (ops/README.md, "Neuron users").
NEURON_MARKER: Final = "-- neuron users below this line"
WAIT: Final = 5.0  # seconds: bound on every bus wait


def node_env(node: str) -> str:
    """``beast`` -> ``BEAST``, ``gpu-1`` -> ``GPU_1`` (the template's ``@NODE_ENV@``)."""
    return node.upper().replace("-", "_")


def password_variable(node: str) -> str:
    return f"CORTEX_NEURON_{node_env(node)}_PASSWORD"


def render_neuron_user(node: str, *, leaf: bool = False) -> str:
    """What the documented sed command makes of the template for ``node``."""
    lines = [line for line in NEURON_TEMPLATE.read_text().splitlines(keepends=True)
             if not line.startswith("##")]
    text = "".join(lines).replace("@NODE@", node).replace("@NODE_ENV@", node_env(node))
    if leaf:
        text = text.replace('"cortex.job.* neurons"', '"cortex.job.*"')
    return text


def with_neuron_users(accounts: str, users: list[str]) -> str:
    """``accounts`` with ``users`` inserted below the marker line, as ``sed '/marker/r'`` does."""
    head, marker, tail = accounts.partition(NEURON_MARKER)
    assert marker, "accounts.conf lost its neuron-users marker line"
    line_end = tail.index("\n") + 1
    return head + marker + tail[:line_end] + "".join(users) + tail[line_end:]


#: Nodes with a user in the shipped test hub: two that connect directly, one behind a leaf node.
DIRECT_NODES: Final = ("beast", "gpu2")
LEAF_NODE: Final = "gpu1"
#: Every user of the shipped test hub and its password.
PASSWORDS: Final = {
    "gateway": "gateway-test-secret",
    "observer": "observer-test-secret",
    **{f"neuron-{node}": f"{node}-test-secret" for node in (*DIRECT_NODES, LEAF_NODE)},
}
#: What the shipped configs read from the environment (accounts.conf, the users, leaf.conf).
CONFIG_ENV: Final = {
    "CORTEX_GATEWAY_PASSWORD": PASSWORDS["gateway"],
    "CORTEX_OBSERVER_PASSWORD": PASSWORDS["observer"],
    **{password_variable(node): PASSWORDS[f"neuron-{node}"]
       for node in (*DIRECT_NODES, LEAF_NODE)},
    "CORTEX_LEAF_HUB_URLS": f"nats-leaf://neuron-{LEAF_NODE}:{PASSWORDS['neuron-gpu1']}"
                            "@nats-a:7422",
}


def shipped_accounts() -> str:
    """accounts.conf with the users of `DIRECT_NODES` and `LEAF_NODE` added as documented."""
    users = [render_neuron_user(node) for node in DIRECT_NODES]
    return with_neuron_users(ACCOUNTS.read_text(),
                             [*users, render_neuron_user(LEAF_NODE, leaf=True)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Hub:
    """A test nats-server with the Cortex users and a leaf node port."""

    def __init__(self, server: EmbeddedNatsServer, passwords: Mapping[str, str], *,
                 leaf_port: int = 0) -> None:
        self.server = server
        self.leaf_port = leaf_port
        self.passwords = dict(passwords)

    def url(self, user: str) -> str:
        """``nats://<user>:<password>@host:port`` (``gateway``, ``observer``, ``neuron-<node>``)."""
        address = self.server.address
        return f"nats://{user}:{self.passwords[user]}@{address.host}:{address.port}"

    @property
    def anonymous_url(self) -> str:
        return self.server.url


@contextmanager
def hub_server(folder: Path, accounts: str | None = None, env: Mapping[str, str] = CONFIG_ENV,
               passwords: Mapping[str, str] = PASSWORDS) -> Iterator[Hub]:
    """A nats-server with ``accounts`` (the text of an accounts file; default `shipped_accounts`)
    and a leaf node port."""
    # includes resolve relative to the config
    (folder / "accounts.conf").write_text(shipped_accounts() if accounts is None else accounts)
    leaf_port = free_port()
    config = folder / "hub.conf"
    config.write_text(
        "max_payload: 8MB\n"
        f"leafnodes {{ listen: 127.0.0.1:{leaf_port} }}\n"
        "include accounts.conf\n"
    )
    server = EmbeddedNatsServer(port=None, config=config)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        server.start()
    try:
        yield Hub(server, passwords, leaf_port=leaf_port)
    finally:
        server.stop()


class RoleClient:
    """A nats-py connection that records the errors the server reports (permission violations)."""

    def __init__(self) -> None:
        self.nc = Client()
        self.errors: list[str] = []
        self.error_seen = asyncio.Event()

    async def _on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))
        self.error_seen.set()

    async def wait_error(self) -> str:
        """The next error the server reports (clears the wait for the one after)."""
        async with asyncio.timeout(WAIT):
            await self.error_seen.wait()
        self.error_seen.clear()
        return self.errors[-1]


@asynccontextmanager
async def connected(url: str, *, inbox_prefix: str = "_INBOX") -> AsyncIterator[RoleClient]:
    client = RoleClient()
    await client.nc.connect(
        url, error_cb=client._on_error, allow_reconnect=False, connect_timeout=int(WAIT),
        inbox_prefix=inbox_prefix,
    )
    try:
        yield client
    finally:
        await client.nc.close()


async def next_msg(queue: asyncio.Queue[Msg]) -> Msg:
    async with asyncio.timeout(WAIT):
        return await queue.get()


async def collect(queue: asyncio.Queue[Msg], count: int) -> list[bytes]:
    """Up to ``count`` messages, fewer if the wait runs out (the caller's assert shows which)."""
    received: list[bytes] = []
    with contextlib.suppress(TimeoutError):
        for _ in range(count):
            received.append((await next_msg(queue)).data)
    return received
