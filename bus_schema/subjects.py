"""Every NATS subject Cortex uses, built in one place.

Model ids contain ``/``, ``.`` and ``:``, which a subject token must not (``.`` separates tokens,
``*``/``>`` are wildcards). `subject_token` encodes an id reversibly into one token: ASCII letters,
digits and ``-`` stay as they are; every other byte of the UTF-8 encoding is written ``_XX``
(upper-case hex), so ``HuggingFaceTB/SmolLM2-135M`` becomes ``HuggingFaceTB_2FSmolLM2-135M``.
The real id also travels in the payload and in the ``Cortex-Model`` header, so ``nats sub`` output
stays readable.

The root (``cortex``) is a parameter so that tests, and several fleets on one server, can isolate
themselves; the server permissions in ``ops/nats/`` mirror these builders.
"""

from __future__ import annotations

import re
from typing import Final, Literal

DEFAULT_ROOT: Final = "cortex"
#: Queue group every neuron joins for `job_subject`, so one neuron takes each job.
JOB_QUEUE_GROUP: Final = "neurons"

#: Control verbs a neuron answers on `control_subject`.
ControlVerb = Literal["load", "unload", "pin", "cancel", "drain", "tokenize"]

_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_TOKEN_RE: Final = re.compile(r"(?:[A-Za-z0-9-]|_[0-9A-F]{2})+")
_NODE_RE: Final = re.compile(r"[^.*>\s]+")
_ROOT_RE: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def subject_token(value: str) -> str:
    """Encode any non-empty string into one NATS subject token, reversibly.

    Raises:
        ValueError: ``value`` is empty.
    """
    if not value:
        raise ValueError("cannot encode an empty string as a subject token")
    return "".join(chr(b) if b in _PLAIN else f"_{b:02X}" for b in value.encode("utf-8"))


def decode_subject_token(token: str) -> str:
    """Invert `subject_token`.

    Raises:
        ValueError: ``token`` is not a well-formed encoded token.
    """
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"not an encoded subject token: {token!r}")
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "_":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(token[i]))
            i += 1
    return out.decode("utf-8")


def check_node_name(name: str) -> str:
    """Return ``name`` if it can be a subject token (no ``.``, ``*``, ``>`` or whitespace).

    Raises:
        ValueError: it cannot.
    """
    if not _NODE_RE.fullmatch(name):
        raise ValueError(
            f"invalid node name {name!r}: it must be non-empty and contain no '.', '*', '>' "
            "or whitespace"
        )
    return name


def check_root(root: str) -> str:
    """Return ``root`` if it is a valid subject prefix (dot-separated plain tokens).

    Raises:
        ValueError: it is not.
    """
    if not _ROOT_RE.fullmatch(root):
        raise ValueError(f"invalid subject root {root!r}")
    return root


def job_subject(model: str, *, root: str = DEFAULT_ROOT) -> str:
    """Jobs for ``model`` (canonical id), served by queue group `JOB_QUEUE_GROUP`."""
    return f"{root}.job.{subject_token(model)}"


def node_job_subject(node: str, model: str, *, root: str = DEFAULT_ROOT) -> str:
    """Jobs for ``model`` directed at one neuron."""
    return f"{root}.node.{check_node_name(node)}.job.{subject_token(model)}"


def control_subject(node: str, verb: ControlVerb, *, root: str = DEFAULT_ROOT) -> str:
    """Control requests (request/reply) to one neuron."""
    return f"{root}.node.{check_node_name(node)}.ctl.{verb}"


def heartbeat_subject(node: str, *, root: str = DEFAULT_ROOT) -> str:
    """Where ``node`` publishes its full state about every second."""
    return f"{root}.fleet.heartbeat.{check_node_name(node)}"


def activation_subject(node: str, *, root: str = DEFAULT_ROOT) -> str:
    """Where ``node`` publishes model lifecycle events as they happen."""
    return f"{root}.fleet.activation.{check_node_name(node)}"


def heartbeat_wildcard(*, root: str = DEFAULT_ROOT) -> str:
    """Every node's heartbeats."""
    return f"{root}.fleet.heartbeat.*"


def activation_wildcard(*, root: str = DEFAULT_ROOT) -> str:
    """Every node's activation events."""
    return f"{root}.fleet.activation.*"


def discover_subject(*, root: str = DEFAULT_ROOT) -> str:
    """A gateway asks here; every neuron answers at once with its `Heartbeat`."""
    return f"{root}.fleet.discover"


def gateway_inbox(gateway_id: str, *, root: str = DEFAULT_ROOT) -> str:
    """The prefix of every inbox of one gateway: ``_INBOX.<root>.<gateway_id>``.

    Job streams arrive on ``<prefix>.<token>`` and discovery answers on ``<prefix>.discover``; the
    gateway also connects with this prefix as nats-py's inbox prefix, so control replies come to
    ``<prefix>.<nuid>.<token>``. Every gateway inbox is thus under `inbox_wildcard`, the one
    pattern a neuron needs publish rights on (ops/nats/accounts.conf).

    Raises:
        ValueError: ``gateway_id`` is not one subject token.
    """
    return f"_INBOX.{root}.{check_node_name(gateway_id)}"


def inbox_wildcard(*, root: str = DEFAULT_ROOT) -> str:
    """Every gateway's inboxes under ``root`` (`gateway_inbox`): where neurons answer."""
    return f"_INBOX.{root}.>"


def model_from_job_subject(subject: str, *, root: str = DEFAULT_ROOT) -> str:
    """The model id encoded in a `job_subject` or `node_job_subject`.

    Raises:
        ValueError: ``subject`` is not a job subject under ``root``.
    """
    prefix = f"{root}."
    if not subject.startswith(prefix):
        raise ValueError(f"not a job subject under {root!r}: {subject!r}")
    parts = subject[len(prefix) :].split(".")
    if len(parts) == 2 and parts[0] == "job":
        return decode_subject_token(parts[1])
    if len(parts) == 4 and parts[0] == "node" and parts[2] == "job":
        return decode_subject_token(parts[3])
    raise ValueError(f"not a job subject under {root!r}: {subject!r}")


class Headers:
    """NATS header names carried next to bus payloads, so traffic and logs line up."""

    JOB_ID: Final = "Job-Id"
    MODEL: Final = "Cortex-Model"
    PROTOCOL: Final = "Cortex-Protocol"
    NODE: Final = "Cortex-Node"
