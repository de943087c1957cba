"""The neuron's configuration file, ``neuron.toml`` (REFERENCE §2.3), parsed with `tomllib` and
validated by converting into typed msgspec Structs, so a bad file fails at start-up with its path,
the key and the reason (``failed to load config from '<path>' (key 'x'): <reason>``).

Layers, each overriding the one before: defaults, the file, ``NEURON_*`` environment variables,
command-line flags (`neuron.cli`). Environment names are ``NEURON_<KEY>`` for top-level keys and
``NEURON_<TABLE>__<KEY>`` for nested ones (``__`` nests: ``NEURON_NATS__URL``,
``NEURON_HARNESS__TORCH__HF_CACHE``, ``NEURON_HARNESS__TORCH__SOURCES__HELEXA__ENDPOINT``). Only
names that match a key are applied, so command-line-only variables (``NEURON_LOG_LEVEL``,
``NEURON_MODEL``...) never break the file's validation. Values read as TOML scalars (``512``,
``1.5``, ``[1, 2]``) when they parse as one, else as strings; boolean keys also take
``true/1/yes/on`` and ``false/0/no/off``. String keys take the text as it is.

Sources (REFERENCE §2.3): a missing ``huggingface`` source is synthesized with
``https://huggingface.co`` (or ``$HF_ENDPOINT``) and ``HF_TOKEN``; its cache is the first of its
``cache_dir``, ``hf_cache``, ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` and huggingface-hub's default.
Tokens are read from the env variable an ``auth_env`` names when the settings are built; an empty
one counts as unset. Another scheme without ``cache_dir`` gets its own cache,
``$HF_HOME/sources/<scheme>``, since the same ``org/name`` may exist on both registries.

Relative paths in the file are taken from the file's directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import msgspec.inspect as mi

from bus_schema.connection import parse_nats_urls
from bus_schema.subjects import DEFAULT_ROOT, check_node_name, check_root
from neuron.errors import ModelSourceError
from neuron.memory import default_budget_mb
from neuron.settings import (
    HF_AUTH_ENV,
    HF_ENDPOINT,
    HF_SCHEME,
    ModelSpec,
    NeuronSettings,
    Source,
    default_node_name,
)
from neuron.sources import no_source_message, parse_model_id

ENV_PREFIX: Final = "NEURON_"
DEFAULT_CONFIG_PATH: Final = Path("neuron.toml")
#: Engines this neuron has.
KNOWN_HARNESSES: Final = ("torch", "ctransformers")

_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})
_FIELD_RE: Final = re.compile(r"at `\$\.?(.*)`$")
_UNKNOWN_RE: Final = re.compile(r"unknown field `([^`]*)`")
_SCHEME_RE: Final = re.compile(r"[^\s:/]+")
_DEVICE_RE: Final = re.compile(r"auto|cpu|cuda(?::\d+)?")
_PATH_PREFIXES: Final = ("/", "./", "../", "~")

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
HarnessName = Literal["torch", "ctransformers"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file, key and reason."""


#: ``fail(key, reason)`` builds the `ConfigError` naming the file, key and reason.
_Fail = Callable[[str | None, str], ConfigError]


class HarnessEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[harnesses]]`` entry: an enabled engine."""

    name: HarnessName


class SourceTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[harness.torch.sources.<scheme>]``: a registry speaking the Hugging Face hub protocol."""

    endpoint: str | None = None
    """Required except for ``huggingface`` (default ``https://huggingface.co``)."""
    auth_env: str | None = None
    """NAME of the env variable holding the token (``huggingface``: default ``HF_TOKEN``)."""
    cache_dir: str | None = None


class TorchHarnessTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[harness.torch]``."""

    hf_cache: str | None = None
    """Legacy ``cache_dir`` of the ``huggingface`` source."""
    default_source: str = HF_SCHEME
    """Scheme for bare ``org/name`` ids."""
    sources: dict[str, SourceTable] = msgspec.field(default_factory=dict)


class HarnessTables(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[harness.<engine>]`` tables."""

    torch: TorchHarnessTable = msgspec.field(default_factory=TorchHarnessTable)


class DefaultModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[default_models]]`` entry, pre-warmed at start-up one at a time."""

    model_id: Annotated[str, msgspec.Meta(min_length=1)]
    """``[scheme:]org/name``, or a local ``.gguf`` file or model folder."""
    harness: HarnessName = "torch"
    quant: str | None = None
    tensor_parallel: PositiveInt | None = None
    devices: list[NonNegativeInt] = msgspec.field(default_factory=list)
    served_name: str | None = None
    """Canonical id to serve it under (default: the hub id, or ``local/<name>`` for paths)."""
    pinned: bool = False


class NatsTable(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[nats]``."""

    url: str = "nats://127.0.0.1:4222"
    """One URL or a comma-separated list of cluster members (credentials in it apply to all)."""
    root: str = DEFAULT_ROOT
    credentials: str | None = None
    """Path to a NATS ``.creds`` file."""
    ca_file: str | None = None
    """PEM file of the CA that signed the servers' TLS certificates (``tls://`` URLs)."""


class NeuronConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``neuron.toml``."""

    name: str | None = None
    """Bus node name (a NATS token); default: the short host name."""
    harnesses: list[HarnessEntry] | None = None
    """Enabled engines; absent: every engine this neuron has."""
    harness: HarnessTables = msgspec.field(default_factory=HarnessTables)
    default_models: list[DefaultModel] = msgspec.field(default_factory=list)
    nats: NatsTable = msgspec.field(default_factory=NatsTable)
    memory_budget_mb: PositiveInt | None = None
    """Per device; absent: `default_memory_budget_mb` of the device's total memory."""
    prefill_chunk_tokens: PositiveInt | None = None
    """Absent: 128 on a CPU, 512 on a GPU."""
    max_prompt_tokens: PositiveInt = 16384
    min_free_vram_mb: NonNegativeInt = 1500
    use_chat_template: bool = True
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_jobs: PositiveInt = 64
    max_batch: PositiveInt = 32
    max_waiting: PositiveInt = 32
    torch_threads: PositiveInt | None = None
    quantize: Literal["auto", "none", "fp16", "int8", "int4"] = "auto"
    prefix_cache_mb: NonNegativeInt = 256
    native_kernels: bool = True
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0


def default_memory_budget_mb(total_mb: int) -> int:
    """The memory budget of a device with ``total_mb`` when ``memory_budget_mb`` is unset: half
    of it (`neuron.memory.default_budget_mb`, the one place the fraction lives)."""
    return max(0, default_budget_mb(total_mb))


def parse_bool(text: str) -> bool | None:
    """``true/1/yes/on`` -> True, ``false/0/no/off`` -> False (any case), else None."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def find_config(explicit: Path | None) -> Path | None:
    """The file to read: ``explicit`` (it must exist; reading reports it), else ``./neuron.toml``
    when present, else None (defaults only)."""
    if explicit is not None:
        return explicit
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_neuron_config(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> NeuronConfig:
    """Read and validate ``neuron.toml`` (None: no file) with env and flag overrides.

    Args:
        path: the file; None uses defaults only.
        environ: the environment (default `os.environ`) for ``NEURON_*`` overrides.
        flags: command-line values by dotted key (``"nats.url"``), the strongest layer.

    Raises:
        ConfigError: ``failed to load config from '<path>'[ (key 'x')]: <reason>``.
    """
    raw = _read_toml(path) if path is not None else {}
    env_tree, origins = env_overrides(os.environ if environ is None else environ)
    flag_tree: dict[str, Any] = {}
    for dotted, value in (flags or {}).items():
        _set_path(flag_tree, dotted.split("."), value)
        origins[dotted] = "a command-line flag"
    merged = _merge(_merge(raw, env_tree), flag_tree)

    def fail(key: str | None, reason: str) -> ConfigError:
        where = f"failed to load config from '{path}'" if path is not None else (
            "invalid neuron configuration")
        detail = ""
        if key:
            origin = _origin(key, origins)
            detail = f" (key '{key}', set by {origin})" if origin else f" (key '{key}')"
        return ConfigError(f"{where}{detail}: {reason}")

    _check_sources_raw(merged, fail)
    try:
        config = msgspec.convert(merged, NeuronConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise fail(_error_key(exc), str(exc)) from None
    _check(config, fail)
    return config


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``NEURON_A__B=v`` -> ``({"a": {"b": v}}, {"a.b": "NEURON_A__B"})``, for names that match a
    key of `NeuronConfig` only; each value converted for its key's type (module docstring)."""
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name.removeprefix(ENV_PREFIX).lower().split("__")
        leaf = _key_type(keys)
        if leaf is None:
            continue
        _set_path(tree, keys, _env_value(environ[name], leaf))
        origins[".".join(keys)] = name
    return tree, origins


def settings_from_config(
    config: NeuronConfig,
    *,
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> NeuronSettings:
    """The runtime settings for ``config``.

    Args:
        base_dir: the config file's directory; relative paths are taken from it (None: as given).
        environ: where ``auth_env`` tokens and the HF cache variables are read (default
            `os.environ`).

    Raises:
        ValueError: a combination the settings refuse (the loader checks the same first).
    """
    env = os.environ if environ is None else environ
    torch = config.harness.torch
    sources = resolve_sources(torch, base_dir=base_dir, environ=env)
    models = tuple(
        ModelSpec(
            source=_model_source(m.model_id, base_dir),
            served_name=m.served_name,
            quant=m.quant,
            pinned=m.pinned,
            tensor_parallel=m.tensor_parallel,
            devices=tuple(m.devices),
            harness=m.harness,
        )
        for m in config.default_models
    )
    return NeuronSettings(
        name=config.name or default_node_name(),
        nats_url=config.nats.url,
        root=config.nats.root,
        nats_credentials=_path(config.nats.credentials, base_dir),
        nats_ca=_path(config.nats.ca_file, base_dir),
        models=models,
        device=config.device,
        dtype=config.dtype,
        hf_cache=sources[HF_SCHEME].cache_dir,
        heartbeat_interval_s=config.heartbeat_interval_s,
        max_jobs=config.max_jobs,
        max_batch=config.max_batch,
        max_waiting=config.max_waiting,
        torch_threads=config.torch_threads,
        quantize=config.quantize,
        prefix_cache_mb=config.prefix_cache_mb,
        native_kernels=config.native_kernels,
        max_prompt_tokens=config.max_prompt_tokens,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
        drain_timeout_s=config.drain_timeout_s,
        min_free_vram_mb=config.min_free_vram_mb,
        use_chat_template=config.use_chat_template,
        memory_budget_mb=config.memory_budget_mb,
        sources=sources,
        default_source=torch.default_source,
        harnesses=enabled_harnesses(config),
    )


def enabled_harnesses(config: NeuronConfig) -> tuple[str, ...]:
    """``[[harnesses]]`` names in file order without repeats; every known engine when absent."""
    if config.harnesses is None:
        return KNOWN_HARNESSES
    return tuple(dict.fromkeys(h.name for h in config.harnesses))


def resolve_sources(
    table: TorchHarnessTable,
    *,
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Source]:
    """Scheme -> `Source`, with the ``huggingface`` source synthesized when missing and every
    ``auth_env`` read now (module docstring)."""
    env = os.environ if environ is None else environ
    resolved: dict[str, Source] = {}
    for scheme, entry in {HF_SCHEME: SourceTable(), **table.sources}.items():
        is_hf = scheme == HF_SCHEME
        auth_env = entry.auth_env if entry.auth_env is not None else (
            HF_AUTH_ENV if is_hf else None)
        if is_hf:
            endpoint = entry.endpoint or env.get("HF_ENDPOINT") or HF_ENDPOINT
            cache = _path(entry.cache_dir or table.hf_cache, base_dir) or hub_cache_dir(env)
        else:
            endpoint = entry.endpoint or ""
            cache = _path(entry.cache_dir, base_dir) or _hf_home(env) / "sources" / scheme
        resolved[scheme] = Source(
            scheme=scheme,
            endpoint=endpoint.rstrip("/") or endpoint,
            token=(env.get(auth_env) or None) if auth_env else None,
            cache_dir=cache,
            auth_env=auth_env or None,
        )
    return resolved


def hub_cache_dir(environ: Mapping[str, str]) -> Path | None:
    """``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else None (huggingface-hub's default)."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    return None


def _hf_home(environ: Mapping[str, str]) -> Path:
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser()
    xdg = environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path("~/.cache").expanduser()) / "huggingface"


def _path(text: str | None, base_dir: Path | None) -> Path | None:
    if not text:
        return None
    path = Path(text).expanduser()
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def _model_source(model_id: str, base_dir: Path | None) -> str:
    """Explicit relative paths (``./m.gguf``) are taken from the config's directory."""
    if base_dir is not None and model_id.startswith(("./", "../")):
        return str(base_dir / model_id)
    return model_id


def _is_local(model_id: str) -> bool:
    return model_id.startswith(_PATH_PREFIXES) or Path(model_id).expanduser().exists()


# --- reading and validation -------------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"failed to load config from '{path}': {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"failed to load config from '{path}': {exc}") from None


def _error_key(exc: msgspec.ValidationError) -> str | None:
    """The offending key of a msgspec error (``default_models[0].quant``); for an unknown field,
    that field itself."""
    message = str(exc)
    match = _FIELD_RE.search(message)
    path = (match.group(1) if match else "") or ""
    unknown = _UNKNOWN_RE.search(message)
    if unknown:
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
    return path or None


def _origin(key: str, origins: Mapping[str, str]) -> str | None:
    """The env variable or flag that set ``key`` (or a table above it), if one did."""
    best: tuple[int, str] | None = None
    for dotted, origin in origins.items():
        covers = key == dotted or key.startswith((f"{dotted}.", f"{dotted}["))
        if covers and (best is None or len(dotted) > best[0]):
            best = (len(dotted), origin)
    return best[1] if best else None


def _check_sources_raw(raw: Mapping[str, Any], fail: _Fail) -> None:
    """Validate each source on its own first: msgspec reports a dict value's errors as
    ``sources[...]``, losing the scheme's name."""
    harness = raw.get("harness")
    torch = harness.get("torch") if isinstance(harness, Mapping) else None
    sources = torch.get("sources") if isinstance(torch, Mapping) else None
    if not isinstance(sources, Mapping):
        return
    for scheme, entry in sources.items():
        try:
            msgspec.convert(entry, SourceTable, strict=True)
        except msgspec.ValidationError as exc:
            inner = _error_key(exc)
            key = f"harness.torch.sources.{scheme}" + (f".{inner}" if inner else "")
            raise fail(key, str(exc)) from None


def _check(config: NeuronConfig, fail: _Fail) -> None:
    """What the types cannot say."""

    def guard(key: str, check: Callable[[str], object], value: str) -> None:
        try:
            check(value)
        except ValueError as exc:
            raise fail(key, str(exc)) from None

    if config.name is not None:
        guard("name", check_node_name, config.name)
    guard("nats.url", parse_nats_urls, config.nats.url)
    guard("nats.root", check_root, config.nats.root)
    if not _DEVICE_RE.fullmatch(config.device):
        raise fail("device", f"unknown device '{config.device}'; use auto, cpu or cuda:N")
    torch = config.harness.torch
    for scheme, entry in torch.sources.items():
        if not _SCHEME_RE.fullmatch(scheme):
            raise fail(f"harness.torch.sources.{scheme}",
                       f"'{scheme}' is not a scheme (no ':', '/' or spaces)")
        if scheme != HF_SCHEME and not entry.endpoint:
            raise fail(f"harness.torch.sources.{scheme}.endpoint",
                       f"source '{scheme}' needs an endpoint (the hub URL to download from)")
    schemes = {HF_SCHEME: None, **torch.sources}
    if torch.default_source not in schemes:
        raise fail("harness.torch.default_source",
                   no_source_message(torch.default_source, schemes))
    enabled = enabled_harnesses(config)
    for i, model in enumerate(config.default_models):
        key = f"default_models[{i}]"
        if model.harness not in enabled:
            raise fail(f"{key}.harness",
                       f"harness '{model.harness}' is not enabled in [[harnesses]] {list(enabled)}")
        if (model.tensor_parallel is not None and model.devices
                and len(model.devices) != model.tensor_parallel):
            raise fail(f"{key}.devices", f"{len(model.devices)} devices listed for "
                       f"tensor_parallel = {model.tensor_parallel}")
        if _is_local(model.model_id):
            continue
        try:
            scheme = parse_model_id(model.model_id).with_default_scheme(
                torch.default_source).scheme
        except ModelSourceError as exc:
            raise fail(f"{key}.model_id", str(exc)) from None
        if scheme not in schemes:
            raise fail(f"{key}.model_id",
                       no_source_message(scheme, schemes))


# --- environment overrides --------------------------------------------------------------------

_CONFIG_TYPE: Final = mi.type_info(NeuronConfig)


def _key_type(keys: list[str]) -> mi.Type | None:
    """The type at ``keys`` inside `NeuronConfig`, or None when they name no key."""
    node: mi.Type = _CONFIG_TYPE
    for key in keys:
        node = _unwrap(node)
        if isinstance(node, mi.StructType):
            field = next((f for f in node.fields if f.encode_name == key), None)
            if field is None:
                return None
            node = field.type
        elif isinstance(node, mi.DictType) and key:
            node = node.value_type
        else:
            return None
    return node


def _unwrap(node: mi.Type) -> mi.Type:
    """``X | None`` -> ``X`` (our optional fields have exactly one other member)."""
    if isinstance(node, mi.UnionType):
        others = [t for t in node.types if not isinstance(t, mi.NoneType)]
        if len(others) == 1:
            return others[0]
    return node


def _env_value(text: str, kind: mi.Type) -> object:
    """An override's value for a key of type ``kind``."""
    leaf = _unwrap(kind)
    if isinstance(leaf, mi.StrType) or (
        isinstance(leaf, mi.LiteralType) and all(isinstance(v, str) for v in leaf.values)
    ):
        return text
    if isinstance(leaf, mi.BoolType):
        flag = parse_bool(text)
        return text if flag is None else flag
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(tree: dict[str, Any], keys: list[str], value: object) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        current = merged.get(key)
        merged[key] = (_merge(current, value) if isinstance(current, Mapping)
                       and isinstance(value, Mapping) else value)
    return merged
