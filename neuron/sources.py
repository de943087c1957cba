"""Resolve what the operator asked for (a path, or a hub id) to model files on local disk.

Accepted forms:

- a ``.gguf`` file;
- a folder holding ``config.json`` and safetensors weights (optionally ``tokenizer.json``,
  ``tokenizer_config.json``, ``chat_template.jinja``, ``generation_config.json``), or ``.gguf``
  files;
- a hub id ``org/name`` or ``scheme:org/name`` (REFERENCE §3), fetched with huggingface-hub into
  the source's cache (honours ``HF_HUB_OFFLINE=1``: then only the cache is used). ``quant`` picks
  the first ``.gguf`` whose lowercased name contains it.

Downloads show huggingface-hub's progress bars on the terminal.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from neuron.engines.base import ModelFiles
from neuron.errors import ModelSourceError

log = logging.getLogger(__name__)

_EXTRA_FILES: Final = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "model.safetensors.index.json",
)


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


def resolve_model(
    spec: str,
    *,
    served_name: str | None = None,
    quant: str | None = None,
    cache_dir: Path | None = None,
) -> ResolvedModel:
    """Resolve ``spec`` (path or hub id) to local files; may download (blocking: run off the loop).

    Args:
        spec: a local path or ``[scheme:]org/name``.
        served_name: the canonical id to serve it under; defaults to the hub id's ``org/name`` or,
            for local paths, ``local/<name>``.
        quant: GGUF quant to pick (case-insensitive substring of the file name).
        cache_dir: hub cache directory; huggingface-hub's default when None.

    Raises:
        ModelSourceError: nothing usable found.
    """
    path = Path(spec).expanduser()
    if path.exists():
        model_id = served_name or default_served_name(spec)
        return ResolvedModel(files=local_model_files(path, model_id, quant=quant), source="file")
    if spec.startswith(("/", "./", "../", "~")):
        raise ModelSourceError(f"model path '{spec}' does not exist")
    source_id = ModelSourceId.parse(spec).with_default_scheme("huggingface")
    if source_id.scheme != "huggingface":
        raise ModelSourceError(
            f"no source configured for scheme '{source_id.scheme}'; configured: ['huggingface']"
        )
    folder = _hub_snapshot(source_id.repo_path(), quant=quant, cache_dir=cache_dir)
    model_id = served_name or source_id.repo_path()
    return ResolvedModel(
        files=local_model_files(folder, model_id, quant=quant), source=source_id.scheme
    )


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


def _hub_snapshot(repo_id: str, *, quant: str | None, cache_dir: Path | None) -> Path:
    from huggingface_hub import snapshot_download  # lazy: keep start-up light
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [*_EXTRA_FILES, "*.safetensors", "*.gguf"]
    if quant is not None:
        patterns = [*_EXTRA_FILES, f"*{quant}*.gguf", f"*{quant.upper()}*.gguf",
                    f"*{quant.lower()}*.gguf"]
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=patterns, cache_dir=str(cache_dir) if cache_dir else None
        )
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"'{repo_id}' is not in the local hub cache and cannot be downloaded "
            f"(offline or unreachable): {exc}"
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelSourceError(f"fetching '{repo_id}' from the hub failed: {exc}") from exc
    log.info("model %s resolved to %s", repo_id, folder)
    return Path(folder)
