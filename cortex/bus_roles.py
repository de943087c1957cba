"""The NATS users of a bus that only Cortex's own processes may use, with fresh passwords.

`cortex up` and `cortex serve` (when they start their own nats-server) lock it with a `BusLock`:
a ``gateway`` user and one ``neuron-<node>`` user per node, each with a password from
`secrets.token_urlsafe` made for this run, and the same least-privilege permissions as the shipped
roles in ops/nats/accounts.conf and ops/nats/neuron-user.conf.template (tests check both against
one list of claims):

- the gateway publishes jobs, control requests and discovery, and subscribes to heartbeats,
  activations, its inboxes (`bus_schema.subjects.inbox_wildcard`) and ``$SRV.>``; it cannot
  publish heartbeats or activations;
- a neuron takes jobs only as a member of queue group ``neurons``, directed jobs and control verbs
  only for its own node name, publishes heartbeats and activations only under that name, and
  answers only on gateway inboxes (plus one reply per request it received, ``allow_responses``,
  for the ``nats`` CLI's control requests and ``$SRV`` pings); it cannot publish jobs or read
  another gateway's traffic.

The permission patterns mirror `bus_schema.subjects` for ``root``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from urllib.parse import quote

import msgspec

from bus_schema.subjects import (
    DEFAULT_ROOT,
    JOB_QUEUE_GROUP,
    activation_subject,
    activation_wildcard,
    check_node_name,
    check_root,
    discover_subject,
    heartbeat_subject,
    heartbeat_wildcard,
    inbox_wildcard,
)
from cortex.embedded_nats import ServerAddress

#: NATS services (micro): ``nats micro ls`` pings every gateway and neuron here.
SERVICES_WILDCARD = "$SRV.>"


class SubjectRules(msgspec.Struct, frozen=True, kw_only=True):
    """``allow``: the subjects (wildcards allowed; ``"<subject> <queue>"`` for a queue group)."""

    allow: list[str]


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    """One user's permissions, in nats-server's config form."""

    publish: SubjectRules
    subscribe: SubjectRules
    allow_responses: bool = False
    """One reply to the reply subject of each message the user received."""


def gateway_permissions(*, root: str = DEFAULT_ROOT) -> Permissions:
    """What a gateway needs: the ``gateway`` role of ops/nats/accounts.conf."""
    return Permissions(
        publish=SubjectRules(allow=[
            f"{root}.job.*",
            f"{root}.node.*.job.*",
            f"{root}.node.*.ctl.*",
            discover_subject(root=root),
        ]),
        subscribe=SubjectRules(allow=[
            heartbeat_wildcard(root=root),
            activation_wildcard(root=root),
            inbox_wildcard(root=root),
            SERVICES_WILDCARD,
        ]),
        allow_responses=True,
    )


def neuron_permissions(node: str, *, root: str = DEFAULT_ROOT) -> Permissions:
    """What the neuron named ``node`` needs: ops/nats/neuron-user.conf.template for ``node``.

    Raises:
        ValueError: ``node`` is not a valid node name.
    """
    check_node_name(node)
    return Permissions(
        publish=SubjectRules(allow=[
            heartbeat_subject(node, root=root),
            activation_subject(node, root=root),
            inbox_wildcard(root=root),
        ]),
        subscribe=SubjectRules(allow=[
            f"{root}.job.* {JOB_QUEUE_GROUP}",
            f"{root}.node.{node}.job.*",
            f"{root}.node.{node}.ctl.*",
            discover_subject(root=root),
            SERVICES_WILDCARD,
        ]),
        allow_responses=True,
    )


class _ServerUser(msgspec.Struct, frozen=True, kw_only=True):
    user: str
    password: str
    permissions: Permissions


class _Authorization(msgspec.Struct, frozen=True, kw_only=True):
    users: list[_ServerUser]


@dataclass(frozen=True, kw_only=True)
class BusUser:
    """One login of a locked bus. The password never appears in ``repr``."""

    name: str
    password: str = field(repr=False)
    permissions: Permissions

    def url(self, address: ServerAddress) -> str:
        """``nats://<name>:<password>@host:port``: a secret, never to be logged (show
        ``address.url`` instead)."""
        return (f"nats://{quote(self.name, safe='')}:{quote(self.password, safe='')}"
                f"@{address.host}:{address.port}")


@dataclass(frozen=True, kw_only=True)
class BusLock:
    """The users of one locked bus: a gateway, and a neuron per node name."""

    gateway: BusUser
    neurons: tuple[BusUser, ...] = ()

    @classmethod
    def generate(cls, *, root: str = DEFAULT_ROOT, nodes: tuple[str, ...] = ()) -> BusLock:
        """Fresh random passwords (`secrets.token_urlsafe`, 256 bits) for a gateway and for the
        neurons named ``nodes`` (none: a bus only the gateway can use).

        Raises:
            ValueError: an invalid root or node name.
        """
        check_root(root)
        return cls(
            gateway=BusUser(name="gateway", password=secrets.token_urlsafe(32),
                            permissions=gateway_permissions(root=root)),
            neurons=tuple(
                BusUser(name=f"neuron-{node}", password=secrets.token_urlsafe(32),
                        permissions=neuron_permissions(node, root=root))
                for node in nodes
            ),
        )

    def neuron(self, node: str) -> BusUser:
        """The user of the neuron named ``node``.

        Raises:
            KeyError: no such node.
        """
        for user in self.neurons:
            if user.name == f"neuron-{node}":
                return user
        raise KeyError(node)

    def server_config(self) -> str:
        """The ``authorization`` block for nats-server's config (a secret: it holds the
        passwords). Anything it does not allow is denied, and there is no anonymous user."""
        users = [_ServerUser(user=u.name, password=u.password, permissions=u.permissions)
                 for u in (self.gateway, *self.neurons)]
        # nats-server's config syntax accepts JSON; quoted strings are never variables.
        body = msgspec.json.encode(_Authorization(users=users)).decode()
        return f"authorization {body}\n"
