"""Resolve what the operator asked for (a path, or a hub id) to model files on local disk.

Accepted forms:

- a ``.gguf`` file;
- a folder holding ``config.json`` and safetensors weights (optionally ``tokenizer.json``,
  ``tokenizer_config.json``, ``chat_template.jinja``, ``generation_config.json``), or ``.gguf``
  files;
- a hub id ``org/name`` or ``scheme:org/name`` (REFERENCE §3), fetched with huggingface-hub from
  the scheme's `Source` (endpoint, token) into its cache (honours ``HF_HUB_OFFLINE=1``: then only
  the cache is used). Bare ids take the default scheme. ``quant`` picks the first ``.gguf`` whose
  lowercased name contains it.

Downloads show huggingface-hub's progress bars on the terminal.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from neuron.engines.base import ModelFiles
from neuron.errors import ModelSourceError
from neuron.settings import HF_SCHEME, Source, huggingface_source

log = logging.getLogger(__name__)

_EXTRA_FILES: Final = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "model.safetensors.index.json",
)
#: The engine named in the "add a sources block" hint (the only one there is).
_ENGINE: Final = "torch"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})


class ModelIdError(ModelSourceError):
    """A model id does not parse as ``scheme:org/name`` (messages as in REFERENCE §3)."""


@dataclass(frozen=True)
class ModelSourceId:
    """``scheme:org/name``; the scheme may be empty."""

    scheme: str
    org: str
    name: str

    @classmethod
    def parse(cls, s: str) -> ModelSourceId:
        """Parse the compact form.

        Raises:
            ModelIdError: with the reference's message for each failure.
        """
        if not s:
            raise ModelIdError("empty model id")
        scheme, sep, rest = s.partition(":")
        if not sep:
            scheme, rest = "", s
        elif not scheme:
            raise ModelIdError(f"model id '{s}' has an empty scheme before ':'")
        elif "/" in scheme:
            raise ModelIdError(
                f"model id '{s}' has a scheme containing '/' which is reserved for org/name"
            )
        org, slash, name = rest.partition("/")
        if not slash:
            raise ModelIdError(f"model id '{s}' is missing the '/' between org and name")
        if not org:
            raise ModelIdError(f"model id '{s}' has an empty org")
        if not name:
            raise ModelIdError(f"model id '{s}' has an empty name")
        if ":" in name:
            raise ModelIdError(
                f"model id '{s}' has a name containing ':' which is reserved for the scheme prefix"
            )
        return cls(scheme, org, name)

    def with_default_scheme(self, scheme: str) -> ModelSourceId:
        return self if self.scheme else ModelSourceId(scheme, self.org, self.name)

    def repo_path(self) -> str:
        return f"{self.org}/{self.name}"

    def __str__(self) -> str:
        return f"{self.scheme}:{self.repo_path()}" if self.scheme else self.repo_path()


@dataclass(frozen=True, kw_only=True)
class ResolvedModel:
    """Files plus where they came from."""

    files: ModelFiles
    source: str
    """``file`` for local paths, else the hub scheme (``huggingface``)."""


def default_served_name(spec: str) -> str:
    """The canonical id ``spec`` is served under when the operator names none: the hub id's
    ``org/name``, or ``local/<name>`` for a local file or folder.

    Raises:
        ModelIdError: ``spec`` is neither an existing path nor a valid model id.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return f"local/{path.stem if path.is_file() else path.name}"
    return ModelSourceId.parse(spec).repo_path()


def no_source_message(scheme: str, configured: Iterable[str]) -> str:
    """REFERENCE §3's error for a scheme without a ``[harness.<engine>.sources.X]`` block."""
    return (
        f"no source configured for scheme '{scheme}'; configured: {sorted(configured)}. "
        f"Add a [harness.{_ENGINE}.sources.{scheme}] block to neuron.toml with endpoint = '...'"
    )


def parse_model_id(spec: str) -> ModelSourceId:
    """`ModelSourceId.parse` with the neuron's wording (REFERENCE §3).

    Raises:
        ModelIdError: ``parse model id '<id>' as scheme:org/name: <err>``.
    """
    try:
        return ModelSourceId.parse(spec)
    except ModelIdError as exc:
        raise ModelIdError(f"parse model id '{spec}' as scheme:org/name: {exc}") from None


def select_source(
    spec: str,
    *,
    sources: Mapping[str, Source] | None = None,
    default_source: str = HF_SCHEME,
    cache_dir: Path | None = None,
) -> tuple[ModelSourceId, Source]:
    """The hub id ``spec`` (scheme filled with ``default_source``) and the source serving it.

    ``sources`` None means only the synthesized ``huggingface`` source, cached in ``cache_dir``
    (the legacy form); with ``sources`` given, ``cache_dir`` is ignored.

    Raises:
        ModelIdError: ``spec`` is not ``[scheme:]org/name``.
        ModelSourceError: no source for its scheme (REFERENCE §3's message).
    """
    if sources is None:
        sources = {HF_SCHEME: huggingface_source(cache_dir)}
    source_id = parse_model_id(spec).with_default_scheme(default_source)
    source = sources.get(source_id.scheme)
    if source is None:
        raise ModelSourceError(no_source_message(source_id.scheme, sources))
    return source_id, source


def resolve_model(
    spec: str,
    *,
    served_name: str | None = None,
    quant: str | None = None,
    cache_dir: Path | None = None,
    sources: Mapping[str, Source] | None = None,
    default_source: str = HF_SCHEME,
) -> ResolvedModel:
    """Resolve ``spec`` (path or hub id) to local files; may download (blocking: run off the loop).

    Args:
        spec: a local path or ``[scheme:]org/name``.
        served_name: the canonical id to serve it under; defaults to the hub id's ``org/name`` or,
            for local paths, ``local/<name>``.
        quant: GGUF quant to pick (case-insensitive substring of the file name).
        cache_dir: hub cache of the ``huggingface`` source when ``sources`` is None (then only
            that source exists); huggingface-hub's default when None. Ignored with ``sources``.
        sources: scheme -> source (`NeuronSettings.sources`).
        default_source: scheme for bare ``org/name`` ids.

    Raises:
        ModelSourceError: nothing usable found, or no source for the id's scheme.
    """
    path = Path(spec).expanduser()
    if path.exists():
        model_id = served_name or default_served_name(spec)
        return ResolvedModel(files=local_model_files(path, model_id, quant=quant), source="file")
    if spec.startswith(("/", "./", "../", "~")):
        raise ModelSourceError(f"model path '{spec}' does not exist")
    source_id, source = select_source(
        spec, sources=sources, default_source=default_source, cache_dir=cache_dir
    )
    folder = _hub_snapshot(source_id.repo_path(), quant=quant, source=source)
    model_id = served_name or source_id.repo_path()
    return ResolvedModel(
        files=local_model_files(folder, model_id, quant=quant), source=source_id.scheme
    )


def pull_model(
    spec: str,
    *,
    quant: str | None = None,
    sources: Mapping[str, Source] | None = None,
    default_source: str = HF_SCHEME,
) -> Path:
    """Download the hub id ``spec`` into its source's cache (``neuron pull``), showing
    huggingface-hub's progress bars; with ``HF_HUB_OFFLINE=1`` only the cache is used.

    Returns:
        The local snapshot folder, checked to hold a loadable model (and ``quant``'s GGUF).

    Raises:
        ModelSourceError: a local path, a bad id, no source for its scheme, a failed download,
            or nothing loadable in the snapshot.
    """
    if Path(spec).expanduser().exists() or spec.startswith(("/", "./", "../", "~")):
        raise ModelSourceError(f"'{spec}' is a local path; pull takes a hub id [scheme:]org/name")
    source_id, source = select_source(spec, sources=sources, default_source=default_source)
    folder = _hub_snapshot(source_id.repo_path(), quant=quant, source=source)
    local_model_files(folder, source_id.repo_path(), quant=quant)
    return folder


def local_model_files(path: Path, model_id: str, *, quant: str | None = None) -> ModelFiles:
    """Describe the model at ``path`` (a ``.gguf`` file or a model folder).

    Raises:
        ModelSourceError: no weights, or no GGUF matching ``quant``.
    """
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"'{path}' is not a .gguf file or a model folder")
        return ModelFiles(model_id=model_id, format="gguf", weights=(path,))
    extras = {name: (path / name) if (path / name).is_file() else None for name in _EXTRA_FILES}
    shards = _safetensors_shards(path, extras["model.safetensors.index.json"])
    if shards and extras["config.json"] is not None:
        return ModelFiles(
            model_id=model_id,
            format="safetensors",
            weights=shards,
            config=extras["config.json"],
            tokenizer=extras["tokenizer.json"],
            tokenizer_config=extras["tokenizer_config.json"],
            chat_template=extras["chat_template.jinja"],
            generation_config=extras["generation_config.json"],
        )
    ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf")
    if ggufs:
        chosen = pick_gguf(ggufs, quant)
        return ModelFiles(
            model_id=model_id,
            format="gguf",
            weights=(chosen,),
            tokenizer=extras["tokenizer.json"],
            tokenizer_config=extras["tokenizer_config.json"],
            chat_template=extras["chat_template.jinja"],
            generation_config=extras["generation_config.json"],
        )
    if shards:
        raise ModelSourceError(f"'{path}' has safetensors weights but no config.json")
    raise ModelSourceError(f"'{path}' holds no model weights (.safetensors or .gguf)")


def pick_gguf(candidates: list[Path], quant: str | None) -> Path:
    """The first GGUF (by name) whose lowercased name contains ``quant``; any when quant is None.

    Raises:
        ModelSourceError: none matches; the message lists what is available.
    """
    if quant is None:
        return candidates[0]
    for candidate in candidates:
        if quant.lower() in candidate.name.lower():
            return candidate
    available = [c.name for c in candidates]
    raise ModelSourceError(f"no GGUF file matches quant '{quant}'; available: {available}")


def _safetensors_shards(folder: Path, index: Path | None) -> tuple[Path, ...]:
    if index is not None:

        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return tuple(folder / name for name in sorted(set(weight_map.values())))
    single = folder / "model.safetensors"
    return (single,) if single.is_file() else ()


def hub_offline(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the cache only; read at
    call time, not when huggingface-hub was imported."""
    env = os.environ if environ is None else environ
    value = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def _hub_snapshot(repo_id: str, *, quant: str | None, source: Source) -> Path:
    from huggingface_hub import snapshot_download  # lazy: keep start-up light
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [*_EXTRA_FILES, "*.safetensors", "*.gguf"]
    if quant is not None:
        patterns = [*_EXTRA_FILES, f"*{quant}*.gguf", f"*{quant.upper()}*.gguf",
                    f"*{quant.lower()}*.gguf"]
    # No token for another registry must not mean huggingface-hub's stored login (that would
    # send the huggingface.co token elsewhere): False sends none.
    token: str | bool | None = source.token or (None if source.scheme == HF_SCHEME else False)
    where = "the hub" if source.scheme == HF_SCHEME else f"{source.scheme} ({source.endpoint})"
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=patterns,
            cache_dir=str(source.cache_dir) if source.cache_dir else None,
            endpoint=source.endpoint,
            token=token,
            local_files_only=hub_offline(),
        )
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"'{repo_id}' is not in the local hub cache and cannot be downloaded "
            f"(offline or unreachable): {exc}"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelSourceError(f"fetching '{repo_id}' from {where} failed: {exc}") from exc
    log.info("model %s resolved to %s", repo_id, folder)
    return Path(folder)
