"""The gateway's view of the fleet, built only from bus messages.

A `Heartbeat` replaces everything known about its node; an `Activation` updates one model between
heartbeats, so a model that became ready is routable at once. A node that misses three heartbeat
intervals is stale: it leaves routing and shows as unhealthy. A job stream that has gone silent
gives its node up sooner, after 2.5 intervals (`FleetView.is_gone`), so a killed or frozen neuron
is noticed within 3 s of its last event (with the default 1 s heartbeat) and the job resumes
elsewhere. Several gateways that hear the same messages reach the same view without sharing
anything else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from bus_schema.messages import MAX_LISTED, Activation, FleetEvent, Heartbeat, ResidentModel

log = logging.getLogger(__name__)

STALE_AFTER_BEATS = 3.0
#: Missed heartbeat intervals after which a silent job stream gives its node up (failover). Sooner
#: than routing does: the stream's own silence is a second witness, and a client is waiting.
GONE_AFTER_BEATS = 2.5
#: A node silent this long (or 100 intervals, if longer) is forgotten altogether: departed and
#: forged nodes do not stay in the view for ever.
FORGET_AFTER_S = 300.0
#: Most nodes the view holds; heartbeats from further new nodes are dropped.
MAX_NODES = 4096
#: A job stream silent this long (or `LOST_AFTER_BEATS` intervals, if longer) whose node's
#: heartbeats, received after that time, no longer list the job ended without its last events
#: reaching this gateway (published while it was reconnecting to NATS). The margin covers a
#: heartbeat read before the stream's last events that were published ahead of it.
LOST_AFTER_S = 5.0
LOST_AFTER_BEATS = 3.0


@dataclass
class NodeView:
    heartbeat: Heartbeat
    received_at: float
    """Monotonic time of the last heartbeat."""
    models: dict[str, ResidentModel] = field(default_factory=dict)
    draining: bool = False
    jobs: frozenset[str] | None = None
    """The jobs the last heartbeat listed (None: it did not list them)."""

    @property
    def name(self) -> str:
        return self.heartbeat.node

    def is_stale(self, now: float) -> bool:
        return now - self.received_at > STALE_AFTER_BEATS * self.heartbeat.interval_s

    def is_gone(self, now: float) -> bool:
        return now - self.received_at > GONE_AFTER_BEATS * self.heartbeat.interval_s


@dataclass(frozen=True)
class Location:
    node: str
    status: str
    healthy: bool
    jobs_running: int


class FleetView:
    """Nodes and the models they hold, as last heard on the bus."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, *, allowed: Iterable[str] | None = None
    ) -> None:
        """Create an empty view.

        Args:
            clock: monotonic seconds.
            allowed: the ``[[neurons]]`` allow-list of ``cortex.toml``; None accepts every node.
                Messages from other nodes are ignored (each name warned about once); a listed
                node that never heartbeats counts in `health` as unhealthy.
        """
        self._clock = clock
        self._nodes: dict[str, NodeView] = {}
        self._allowed = frozenset(allowed) if allowed is not None else None
        self._refused: set[str] = set()
        self._listeners: list[Callable[[], None]] = []

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change (cold-load waiters wake on it)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _accepts(self, node: str) -> bool:
        if self._allowed is None or node in self._allowed:
            return True
        if node not in self._refused and len(self._refused) < 1024:
            self._refused.add(node)
            log.warning("ignoring neuron '%s': not in the [[neurons]] allow-list", node)
        return False

    def apply(self, event: FleetEvent) -> None:
        """Fold one heartbeat or activation into the view."""
        if not self._accepts(event.node):
            return
        now = self._clock()
        match event:
            case Heartbeat():
                if event.node not in self._nodes and len(self._nodes) >= MAX_NODES:
                    self._forget_departed(now)
                    if len(self._nodes) >= MAX_NODES:
                        self._warn_full(event.node)
                        return
                self._nodes[event.node] = NodeView(
                    heartbeat=event,
                    received_at=now,
                    models={m.id: m for m in event.models},
                    draining=event.draining,
                    jobs=None if event.jobs is None else frozenset(event.jobs),
                )
            case Activation():
                self._apply_activation(event)
        self._changed()

    def _forget_departed(self, now: float) -> None:
        for name, view in list(self._nodes.items()):
            if now - view.received_at > max(FORGET_AFTER_S, 100 * view.heartbeat.interval_s):
                del self._nodes[name]
                log.info("forgot node '%s': silent for %.0fs", name, now - view.received_at)

    def _warn_full(self, node: str) -> None:
        if len(self._refused) < 1024 and node not in self._refused:
            self._refused.add(node)
            log.warning("ignoring node '%s': the fleet view already holds %d nodes", node,
                        MAX_NODES)

    def mark_loaded(self, node: str, model: str, *, memory_mb: int | None, pinned: bool) -> None:
        """A load this gateway asked for succeeded: routable at once (REFERENCE §5.2), before the
        node's next heartbeat confirms it."""
        view = self._nodes.get(node)
        if view is None:
            return
        current = view.models.get(model) or ResidentModel(id=model, status="loaded")
        view.models[model] = msgspec.structs.replace(
            current, status="loaded", load_progress=None,
            memory_mb=memory_mb if memory_mb is not None else current.memory_mb,
            pinned=pinned or current.pinned, loaded_at=current.loaded_at or time.time(),
        )
        self._changed()

    def forget_model(self, node: str, model: str) -> None:
        """An eviction this gateway asked for succeeded."""
        view = self._nodes.get(node)
        if view is not None and view.models.pop(model, None) is not None:
            self._changed()

    def _apply_activation(self, event: Activation) -> None:
        node = self._nodes.get(event.node)
        if node is None:
            return  # its first heartbeat will carry the full state
        if event.event in ("draining", "stopping"):
            node.draining = True
            return
        if event.model is None:
            return
        current = node.models.get(event.model)
        if current is None and len(node.models) >= MAX_LISTED:
            return  # a heartbeat lists at most this many; activations must not grow it further
        if event.event in ("failed", "unloaded", "evicted"):
            node.models.pop(event.model, None)
        elif event.event == "ready":
            base = current or ResidentModel(id=event.model, status="loaded")
            node.models[event.model] = msgspec.structs.replace(
                base, status="loaded", load_progress=None
            )
        else:  # queued, started, progress
            base = current or ResidentModel(id=event.model, status="loading")
            node.models[event.model] = msgspec.structs.replace(
                base, status="loading", load_progress=event.progress
            )

    def nodes(self) -> list[NodeView]:
        """Every node heard from recently enough to remember (see `FORGET_AFTER_S`)."""
        self._forget_departed(self._clock())
        return sorted(self._nodes.values(), key=lambda n: n.name)

    def node(self, name: str) -> NodeView | None:
        return self._nodes.get(name)

    def healthy_nodes(self) -> list[NodeView]:
        """Nodes heard from recently and not draining, by name."""
        now = self._clock()
        return [n for n in self.nodes() if not n.is_stale(now) and not n.draining]

    def loading_on(self, model: str) -> list[str]:
        """Healthy nodes loading ``model`` (a load started by any gateway, or a pre-warm)."""
        found = []
        for n in self.healthy_nodes():
            m = n.models.get(model)
            if (m is not None and m.status in ("loading", "recovering")) or any(
                _bare(spec) == model
                for spec in (*n.heartbeat.activation.pending, *n.heartbeat.activation.in_progress)
            ):
                found.append(n.name)
        return found

    def is_healthy(self, name: str) -> bool:
        node = self._nodes.get(name)
        return node is not None and not node.is_stale(self._clock())

    def is_gone(self, name: str) -> bool:
        """Whether a silent job stream from ``name`` should be given up: the node missed
        `GONE_AFTER_BEATS` heartbeat intervals, or is not known at all. The one rule for
        "this node is gone" mid-stream (`cortex.bus.JobStream.events`)."""
        node = self._nodes.get(name)
        return node is None or node.is_gone(self._clock())

    def lost_job(self, name: str, job_id: str, *, silent_since: float) -> bool:
        """Whether node ``name`` ended job ``job_id`` without this gateway receiving the job's
        last events: the job's stream has been silent since ``silent_since`` (monotonic), and the
        node's last heartbeat, received at least `LOST_AFTER_S` (or `LOST_AFTER_BEATS`
        intervals) after that, lists its jobs and not this one."""
        node = self._nodes.get(name)
        if node is None or node.jobs is None or job_id in node.jobs:
            return False
        margin = max(LOST_AFTER_S, LOST_AFTER_BEATS * node.heartbeat.interval_s)
        return node.received_at - silent_since >= margin

    def health(self) -> tuple[int, int]:
        """(healthy nodes, known nodes); allow-listed nodes never heard of count as unhealthy."""
        now = self._clock()
        healthy = sum(not n.is_stale(now) for n in self._nodes.values())
        silent = len(self._allowed - self._nodes.keys()) if self._allowed is not None else 0
        return healthy, len(self._nodes) + silent

    def locations(self, model: str) -> list[Location]:
        """Every node that reports ``model``, sorted by node name."""
        now = self._clock()
        return [
            Location(
                node=n.name,
                status=n.models[model].status,
                healthy=not n.is_stale(now) and not n.draining,
                jobs_running=n.heartbeat.jobs_running,
            )
            for n in self.nodes()
            if model in n.models
        ]

    def routable(self, model: str) -> list[Location]:
        """Healthy nodes where ``model`` is loaded, least loaded first."""
        found = [
            loc
            for loc in self.locations(model)
            if loc.healthy and loc.status in ("loaded", "reloading")
        ]
        return sorted(found, key=lambda loc: (loc.jobs_running, loc.node))

    def model_ids(self) -> list[str]:
        """Every model any known node reports, sorted."""
        return sorted({m for n in self._nodes.values() for m in n.models})

    def model(self, model: str) -> ResidentModel | None:
        """The richest report of ``model`` (a loaded one preferred)."""
        best: ResidentModel | None = None
        for node in self.nodes():
            found = node.models.get(model)
            if found is not None and (best is None or found.status == "loaded"):
                best = found
        return best


def _bare(spec: str) -> str:
    """``scheme:org/name`` → ``org/name`` (activation lists carry the load spec as given)."""
    scheme, sep, rest = spec.partition(":")
    return rest if sep and "/" not in scheme else spec
