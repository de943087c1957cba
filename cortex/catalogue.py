"""The catalogue: the models this fleet may serve (``models.toml`` profiles) and the aliases
clients may call them by (REFERENCE §2.2). Pure data and rules, no I/O: which nodes a profile is
feasible on, its effective residency priority, and the load spec a neuron gets for it."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from bus_schema.messages import Device, LoadRequest
from cortex.config import ModelEntry, ModelsConfig

#: Effective priorities (REFERENCE §2.2).
PINNED_PRIORITY: Final = 1000
DEFAULT_PRIORITY: Final = 100


@dataclass(frozen=True)
class Aliases:
    """Alias → concrete model id, without chaining. Keys with ``*``, ``?`` or ``[`` are globs
    (``claude-*`` catches Claude Code's model names), tried in file order after exact names."""

    exact: Mapping[str, str]
    globs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, mapping: Mapping[str, str]) -> Aliases:
        exact = {k: v for k, v in mapping.items() if not _is_glob(k)}
        globs = tuple((k, v) for k, v in mapping.items() if _is_glob(k))
        return cls(exact, globs)

    def resolve(self, name: str) -> str:
        """The concrete id for ``name`` (``name`` itself when no alias matches)."""
        target = self.exact.get(name)
        if target is not None:
            return target
        for pattern, glob_target in self.globs:
            if fnmatch.fnmatchcase(name, pattern):
                return glob_target
        return name


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def compute_devices(devices: Sequence[Device]) -> list[Device]:
    """The devices models run on: the accelerators when a node has any, else its CPU."""
    accelerators = [d for d in devices if d.kind != "cpu"]
    return accelerators or [d for d in devices if d.kind == "cpu"]


@dataclass(frozen=True)
class Catalogue:
    """Profiles by id, and the aliases. A real id always wins over an alias of the same name."""

    profiles: Mapping[str, ModelEntry] = field(default_factory=dict)
    aliases: Aliases = field(default_factory=lambda: Aliases.of({}))

    @classmethod
    def of(cls, config: ModelsConfig) -> Catalogue:
        """From a parsed ``models.toml`` (a duplicate id: the first entry wins)."""
        profiles: dict[str, ModelEntry] = {}
        for entry in config.models:
            profiles.setdefault(entry.id, entry)
        return cls(profiles, Aliases.of(config.aliases))

    def resolve(self, name: str) -> str:
        """The concrete id a client's model name routes to."""
        return name if name in self.profiles else self.aliases.resolve(name)

    def profile(self, model: str) -> ModelEntry | None:
        return self.profiles.get(model)

    def priority(self, model: str) -> int:
        """Effective residency priority: ``residency_priority``, else 1000 for pinned models,
        else 100 (also for models not in the catalogue)."""
        entry = self.profiles.get(model)
        if entry is None:
            return DEFAULT_PRIORITY
        if entry.residency_priority is not None:
            return entry.residency_priority
        return PINNED_PRIORITY if entry.pinned_on else DEFAULT_PRIORITY


def is_feasible_on(entry: ModelEntry, node: str, devices: Sequence[Device]) -> bool:
    """REFERENCE §2.2: not pinned elsewhere, enough devices, enough of them above the floor."""
    if entry.pinned_on and node not in entry.pinned_on:
        return False
    usable = compute_devices(devices)
    if len(usable) < entry.min_devices:
        return False
    if entry.min_device_vram_mb is not None:
        floor = entry.min_device_vram_mb
        return sum(d.memory_total_mb >= floor for d in usable) >= entry.min_devices
    return True


def load_spec(entry: ModelEntry, devices: Sequence[Device], *, node: str) -> LoadRequest:
    """The ``ctl.load`` a neuron gets for ``entry`` (REFERENCE §5.2): ``source:id`` when the
    profile names a source; ``tensor_parallel`` = ``min_devices`` above 1; the first
    ``min_devices`` devices at or above the floor (else ``0..min_devices``)."""
    usable = compute_devices(devices)
    floor = entry.min_device_vram_mb or 0
    chosen = [d.index for d in usable if d.memory_total_mb >= floor][: entry.min_devices]
    if len(chosen) < entry.min_devices:
        chosen = list(range(entry.min_devices))
    return LoadRequest(
        model_id=f"{entry.source}:{entry.id}" if entry.source else entry.id,
        harness=entry.harness,
        quant=entry.quant,
        tensor_parallel=entry.min_devices if entry.min_devices > 1 else None,
        devices=tuple(chosen),
        pinned=node in entry.pinned_on,
        memory_mb=entry.vram_mb,
    )
