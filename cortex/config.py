"""The gateway's configuration files (REFERENCE §2.1–§2.2): ``cortex.toml`` and the
``models.toml`` catalogue it names, parsed with `tomllib` and validated by converting into typed
msgspec Structs, so a bad file fails at start-up with its path, the key and the reason.

Environment variables ``CORTEX_<TABLE>__<KEY>`` override keys of ``cortex.toml`` (``__`` nests:
``CORTEX_GATEWAY__LISTEN=127.0.0.1:8080``; a TOML value such as ``["a", "b"]`` gives a list);
command-line flags override both (`cortex.cli`). API keys come from ``[auth]`` and from a key
file (`read_key_file`); a key that cannot be one stops start-up, and no message repeats a key.
A ``models.toml`` that is missing or broken leaves the catalogue empty with a warning: start-up
never fails because of it (as the reference).
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from bus_schema.messages import ModelId, NodeName
from cortex.auth import ApiKey, key_problem
from cortex.errors import field_path

log = logging.getLogger(__name__)

ENV_PREFIX: Final = "CORTEX_"
T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file, key and reason."""


class GatewayTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    listen: str
    """``host:port`` the API listens on."""
    metrics_listen: str = "0.0.0.0:31314"


class EvictionTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    strategy: Literal["lru", "priority"]
    defrag_after_cycles: Annotated[int, msgspec.Meta(ge=0)] = 50
    """Warn about fragmentation after this many eviction cycles; 0 never warns."""
    min_residency_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """Ours: a model loaded more recently than this is never evicted (no thrash)."""


class LoadingTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ours: cold loads and the requests that wait for them."""

    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    queue_depth: Annotated[int, msgspec.Meta(ge=1)] = 64
    wait_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0


class NeuronEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: NodeName
    endpoint: str | None = None
    """Accepted for compatibility with the reference's files; unused (neurons are on the bus)."""


class NatsTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str | None = None
    """One URL or a comma-separated list of cluster members, credentials in it
    (``nats://gateway:secret@bus:4222``) applying to all; None starts the embedded server."""
    root: str = "cortex"
    ca_file: str | None = None
    """PEM file of the CA that signed the servers' TLS certificates (relative: to this file)."""


class KeyEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ours: one ``[[auth.keys]]`` entry."""

    key: str
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] | None = None
    """For logs (the key itself is never logged); default ``key #n``."""
    models: list[str] | None = None
    """Model ids or globs this key may use (after alias resolution); default every model."""
    max_concurrent: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Requests in flight at once for this key; default no limit."""


class AuthTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ours: API keys (`cortex.auth`)."""

    api_keys: list[str] = msgspec.field(default_factory=list)
    """Plain keys: every model, no limit."""
    keys: list[KeyEntry] = msgspec.field(default_factory=list)
    allow_unauthenticated: bool = False
    """Listen beyond loopback with no keys (something in front authenticates)."""


class CortexConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``cortex.toml``."""

    gateway: GatewayTable
    eviction: EvictionTable
    models_config: str = "models.toml"
    """Relative paths are taken from the directory of ``cortex.toml``."""
    neurons: list[NeuronEntry] = msgspec.field(default_factory=list)
    nats: NatsTable = msgspec.field(default_factory=NatsTable)
    loading: LoadingTable = msgspec.field(default_factory=LoadingTable)
    auth: AuthTable = msgspec.field(default_factory=AuthTable)


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One ``[[models]]`` entry of the catalogue."""

    id: ModelId
    harness: str
    quant: str | None = None
    vram_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_devices: Annotated[int, msgspec.Meta(ge=1)] = 1
    min_device_vram_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    pinned_on: list[NodeName] = msgspec.field(default_factory=list)
    source: str | None = None
    residency_priority: int | None = None


class ModelsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``models.toml``."""

    models: list[ModelEntry] = msgspec.field(default_factory=list)
    aliases: dict[str, str] = msgspec.field(default_factory=dict)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"failed to load config from '{path}': {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"failed to load config from '{path}': {exc}") from None


def _convert(raw: dict[str, Any], kind: type[T], path: Path) -> T:
    try:
        return msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        field = field_path(exc)
        where = f" (key '{field}')" if field else ""
        raise ConfigError(f"failed to load config from '{path}'{where}: {exc}") from None


def _env_value(text: str) -> object:
    """An environment override's value: a TOML scalar when it reads as one, else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``CORTEX_A__B=v`` → ``{"a": {"b": v}}``; only names with ``__`` are config keys (plain
    ``CORTEX_PORT`` and the like belong to the command-line flags)."""
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        *tables, key = name.removeprefix(ENV_PREFIX).lower().split("__")
        node = tree
        for table in tables:
            child = node.setdefault(table, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[key] = _env_value(value)
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        current = merged.get(key)
        merged[key] = (_merge(current, value) if isinstance(current, dict)
                       and isinstance(value, Mapping) else value)
    return merged


def load_cortex_config(path: Path, environ: Mapping[str, str] | None = None) -> CortexConfig:
    """Read and validate ``cortex.toml`` with the environment's overrides.

    Raises:
        ConfigError: ``failed to load config from '<path>'[ (key 'x')]: <reason>``.
    """
    raw = _merge(_read_toml(path), env_overrides(os.environ if environ is None else environ))
    config = _convert(raw, CortexConfig, path)
    try:
        listen_address(config.gateway.listen)
        listen_address(config.gateway.metrics_listen)
    except ValueError as exc:
        raise ConfigError(f"failed to load config from '{path}': {exc}") from None
    config_keys(config.auth, path)
    return config


def config_keys(auth: AuthTable, path: Path) -> list[ApiKey]:
    """The keys of ``[auth]``: ``api_keys`` first, then ``[[auth.keys]]``; unnamed ones are
    ``key #n`` in that order.

    Raises:
        ConfigError: a key that cannot be one (the message names its place, never the key).
    """
    keys: list[ApiKey] = []
    entries = [(f"auth.api_keys[{i}]", KeyEntry(key=k)) for i, k in enumerate(auth.api_keys)]
    entries += [(f"auth.keys[{i}].key", e) for i, e in enumerate(auth.keys)]
    for number, (where, entry) in enumerate(entries, start=1):
        problem = key_problem(entry.key)
        if problem is not None:
            raise ConfigError(f"failed to load config from '{path}' (key '{where}'): {problem}")
        keys.append(ApiKey(key=entry.key, name=entry.name or f"key #{number}",
                           models=None if entry.models is None else tuple(entry.models),
                           max_concurrent=entry.max_concurrent))
    _check_unique(keys, f"failed to load config from '{path}'")
    return keys


def read_key_file(path: Path, *, first_number: int = 1) -> list[ApiKey]:
    """The keys of an API key file: one per line; blank lines and ``#`` comments are skipped,
    surrounding whitespace is ignored. Key ``n`` of the file is named ``key #n`` (counting on
    from ``first_number``); each may use every model, with no limit.

    Raises:
        ConfigError: the file cannot be read or holds a line that cannot be a key (named by its
            line number, never by its content).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"failed to read API key file '{path}': {reason}") from None
    try:
        if path.stat().st_mode & 0o004:
            log.warning("API key file '%s' is readable by every user: chmod 0640 it", path)
    except OSError as exc:
        log.warning("cannot check the permissions of '%s': %s", path, exc)
    keys: list[ApiKey] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        problem = key_problem(key)
        if problem is not None:
            raise ConfigError(f"API key file '{path}', line {line_number}: {problem}")
        keys.append(ApiKey(key=key, name=f"key #{first_number + len(keys)}"))
    if not keys:
        raise ConfigError(f"API key file '{path}' holds no key")
    _check_unique(keys, f"API key file '{path}'")
    return keys


def api_keys(config: CortexConfig | None, config_path: Path | None,
             key_file: Path | None) -> tuple[ApiKey, ...]:
    """Every key the gateway accepts: ``[auth]`` of ``cortex.toml``, then the key file's.

    Raises:
        ConfigError: a bad key or file, or one key given twice.
    """
    keys = config_keys(config.auth, config_path) if config and config_path else []
    if key_file is not None:
        keys += read_key_file(key_file, first_number=len(keys) + 1)
    _check_unique(keys, "API keys")
    return tuple(keys)


def _check_unique(keys: list[ApiKey], where: str) -> None:
    seen: dict[str, str] = {}
    for key in keys:
        if key.key in seen:
            raise ConfigError(f"{where}: {key.name} is the same key as {seen[key.key]}")
        seen[key.key] = key.name


def listen_address(listen: str) -> tuple[str, int]:
    """``"host:port"`` (``[v6]:port`` too) → ``(host, port)``.

    Raises:
        ValueError: not of that form, or the port is out of range.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen address '{listen}' is not host:port")
    return host.strip("[]"), int(port)


def models_path(config: CortexConfig, config_path: Path) -> Path:
    named = Path(config.models_config)
    return named if named.is_absolute() else config_path.parent / named


def load_models(path: Path) -> ModelsConfig:
    """The catalogue; empty (with a warning) when the file is missing or invalid."""
    try:
        return _convert(_read_toml(path), ModelsConfig, path)
    except ConfigError as exc:
        log.warning("%s; the catalogue is empty", exc)
        return ModelsConfig()


def check_models(path: Path) -> list[str]:
    """Problems ``cortex check-config`` reports: the file itself, duplicate ids, aliases that
    point at aliases, aliases that shadow real ids."""
    try:
        models = _convert(_read_toml(path), ModelsConfig, path)
    except ConfigError as exc:
        return [str(exc)]
    problems: list[str] = []
    seen: set[str] = set()
    for entry in models.models:
        if entry.id in seen:
            problems.append(f"{path}: duplicate model id '{entry.id}'")
        seen.add(entry.id)
    for alias, target in models.aliases.items():
        if alias in seen:
            problems.append(f"{path}: alias '{alias}' shadows the catalogued model '{alias}'")
        if target in models.aliases:
            problems.append(f"{path}: alias '{alias}' points at the alias '{target}' "
                            "(aliases do not chain)")
    return problems
