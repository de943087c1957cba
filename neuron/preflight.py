"""Load preflight (REFERENCE §6.6): refuse an infeasible load before any download.

Preflight makes one repo listing and downloads nothing. The listing is classified as

- ``dense``: safetensors only;
- ``mixed``: safetensors and GGUF (the loader prefers dense);
- ``gguf``: GGUF only;
- nothing usable (``None``), which is refused as ``empty_repo``.

and the requested ``quant`` and ``tensor_parallel`` are checked against it. A refusal is a
`PreflightError` carrying the bus `PreflightFailure` (the reference's 422 body):

- ``repo_fetch_failed``: the listing itself failed (``cause``);
- ``empty_repo``: no ``.safetensors`` and no ``.gguf`` file;
- ``tp_requires_safetensors``: a GGUF-only repo with ``tensor_parallel > 1``;
- ``quant_not_found``: ``quant`` set and no GGUF whose lowercased file name contains it.

``quant`` always means "a GGUF file whose name contains this" (as in `neuron.sources.pick_gguf`),
whatever else the repo holds: with ``quant`` set the loader fetches only matching ``.gguf`` files,
so a mixed repo must have a matching GGUF, and a dense-only repo is refused as ``quant_not_found``
with ``available: []`` (the reference let such loads through and they failed after the download).
An empty ``quant`` counts as unset.

Hub listings honour huggingface-hub's offline switch (``HF_HUB_OFFLINE=1``, read through
``huggingface_hub.constants`` when called): offline, the cached snapshot of ``main`` is listed
instead. Online, a failed listing falls back to that snapshot when there is one (the reference's
cold boot with a warm cache and no network); only when neither works is it ``repo_fetch_failed``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

import msgspec

from bus_schema.messages import PreflightFailure
from neuron.errors import NeuronError

log = logging.getLogger(__name__)

RepoFormat = Literal["dense", "mixed", "gguf"]


class PreflightError(NeuronError):
    """A load refused by preflight; ``failure`` is the structured body for the 422 reply."""

    def __init__(self, failure: PreflightFailure) -> None:
        self.failure = failure
        super().__init__(describe(failure))


def describe(failure: PreflightFailure) -> str:
    """A one-line, operator-readable rendering of ``failure``."""
    model_id = failure.model_id
    if failure.kind == "repo_fetch_failed":
        return f"failed to list the files of '{model_id}': {failure.cause}"
    if failure.kind == "empty_repo":
        return (
            f"repo '{model_id}' has no recognised weight files (no .gguf, no .safetensors); "
            "a tokenizer-only repo cannot be loaded directly"
        )
    if failure.kind == "tp_requires_safetensors":
        count = len(failure.gguf_quants or ())
        return (
            f"cannot load '{model_id}' with tensor_parallel={failure.tp_size}: repo is GGUF-only "
            f"({count} .gguf files); tensor parallelism requires dense safetensors. "
            f"{failure.suggestion}"
        )
    nearest = f"; nearest: {failure.nearest}" if failure.nearest is not None else ""
    return (
        f"quant '{failure.requested}' not found in {model_id}; "
        f"available: {_list_text(failure.available or ())}{nearest}"
    )


def classify(files: Sequence[str]) -> RepoFormat | None:
    """The repo format a file listing shows; None when it holds neither safetensors nor GGUF."""
    dense = any(f.lower().endswith(".safetensors") for f in files)
    gguf = any(f.lower().endswith(".gguf") for f in files)
    if dense:
        return "mixed" if gguf else "dense"
    return "gguf" if gguf else None


def check(
    model_id: str,
    files: Sequence[str],
    *,
    quant: str | None = None,
    tensor_parallel: int | None = None,
) -> RepoFormat:
    """Decide whether ``files`` (one repo listing) can be loaded as requested.

    Args:
        model_id: the id as requested (``huggingface:Org/Name``); reported in failures.
        files: repo-relative paths, as `list_hub` or `list_local` return them.
        quant: GGUF quant, a case-insensitive substring of the file name; None or "" for none.
        tensor_parallel: devices to shard over; None or 1 for a single device.

    Returns:
        The repo's format.

    Raises:
        PreflightError: ``empty_repo``, ``tp_requires_safetensors`` or ``quant_not_found``.
    """
    fmt = classify(files)
    if fmt is None:
        raise PreflightError(PreflightFailure(kind="empty_repo", model_id=model_id))
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if fmt == "gguf" and tensor_parallel is not None and tensor_parallel > 1:
        raise PreflightError(
            PreflightFailure(
                kind="tp_requires_safetensors",
                model_id=model_id,
                tp_size=tensor_parallel,
                gguf_quants=tuple(ggufs),
                suggestion=(
                    f"Set tensor_parallel=1 and pick a quant from {_list_text(ggufs)}, "
                    "or use a dense safetensors release of this model."
                ),
            )
        )
    if quant and not any(quant.lower() in PurePosixPath(f).name.lower() for f in ggufs):
        raise PreflightError(
            PreflightFailure(
                kind="quant_not_found",
                model_id=model_id,
                requested=quant,
                available=tuple(ggufs),
                nearest=nearest_quant(quant, ggufs),
            )
        )
    return fmt


def quant_token(file: str) -> str:
    """The quant-ish token of a GGUF file: the last ``-`` segment of its stem, lowercased
    (``Qwen3-8B-Q6_K_P.gguf`` → ``q6_k_p``)."""
    return PurePosixPath(file).stem.rsplit("-", 1)[-1].lower()


def nearest_quant(requested: str, ggufs: Sequence[str]) -> str | None:
    """The quant token of ``ggufs`` closest to ``requested`` (Levenshtein, case-insensitive; the
    first in order on a tie); None when there are no tokens or nothing was requested."""
    tokens = list(dict.fromkeys(quant_token(f) for f in ggufs))
    if not requested or not tokens:
        return None
    wanted = requested.lower()
    return min(tokens, key=lambda token: levenshtein(wanted, token))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between ``a`` and ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# --------------------------------------------------------------------------- listings


def list_local(path: Path) -> list[str]:
    """The files of a local model: a folder's files as sorted, relative posix paths (hidden
    folders such as ``.git`` and ``.cache`` skipped), or a single file's name.

    Raises:
        PreflightError: ``repo_fetch_failed`` (model id = the path) when it cannot be read.
    """
    try:
        if path.is_file():
            return [path.name]
        if not path.is_dir():
            raise FileNotFoundError(f"'{path}' does not exist")
        return _walk_files(path, strict=True)
    except OSError as exc:
        raise _fetch_failed(str(path), str(exc)) from exc


def list_hub(
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: Path | None = None,
) -> list[str]:
    """List a hub repo's files (``org/name``) with one request, or from the cache when offline.

    Args:
        repo_id: ``org/name``.
        endpoint: the hub's base URL; huggingface-hub's default when None.
        token: access token; an empty one counts as unset.
        cache_dir: hub cache directory; ``huggingface_hub.constants.HF_HUB_CACHE`` when None.

    Raises:
        PreflightError: ``repo_fetch_failed`` (model id = ``repo_id``), with the cause.
    """
    from huggingface_hub import HfApi, constants  # lazy: keep start-up light

    cache = cache_dir if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    if constants.HF_HUB_OFFLINE:
        cached = cached_snapshot_files(cache, repo_id)
        if cached is None:
            raise _fetch_failed(
                repo_id,
                f"'{repo_id}' is not in the local hub cache at '{cache}' "
                "and the hub is offline (HF_HUB_OFFLINE=1)",
            )
        return cached
    try:
        return sorted(HfApi(endpoint=endpoint).list_repo_files(repo_id, token=token or None))
    except Exception as exc:  # any listing failure is a typed refusal, never a crash
        cause = f"{type(exc).__name__}: {exc}"
        cached = cached_snapshot_files(cache, repo_id)
        if cached is None:
            raise _fetch_failed(repo_id, cause) from exc
        log.warning(
            "listing %s failed (%s); using the cached snapshot (%d files)",
            repo_id, cause, len(cached),
        )
        return cached


def cached_snapshot_files(cache: Path, repo_id: str) -> list[str] | None:
    """The files of ``repo_id``'s cached ``main`` snapshot (huggingface-hub layout:
    ``<cache>/models--Org--Name/refs/main`` names the commit, ``snapshots/<commit>/`` holds the
    files), as sorted relative posix paths; dangling links are skipped. None when there is no
    ref, no snapshot, or an empty one."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo_dir / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        return None
    files = _walk_files(snapshot, strict=False)
    return files or None


def preflight_hub(
    model_id: str,
    repo_id: str,
    *,
    quant: str | None = None,
    tensor_parallel: int | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: Path | None = None,
) -> RepoFormat:
    """`list_hub` then `check`; failures name ``model_id`` (the id as requested).

    Blocking (one HTTP request online): run it off the event loop.

    Raises:
        PreflightError: any of the four kinds.
    """
    try:
        files = list_hub(repo_id, endpoint=endpoint, token=token, cache_dir=cache_dir)
    except PreflightError as exc:
        failure = msgspec.structs.replace(exc.failure, model_id=model_id)
        raise PreflightError(failure) from exc
    return check(model_id, files, quant=quant, tensor_parallel=tensor_parallel)


def preflight_local(
    model_id: str,
    path: Path,
    *,
    quant: str | None = None,
    tensor_parallel: int | None = None,
) -> RepoFormat:
    """`list_local` then `check`; failures name ``model_id``.

    Raises:
        PreflightError: any of the four kinds.
    """
    try:
        files = list_local(path)
    except PreflightError as exc:
        failure = msgspec.structs.replace(exc.failure, model_id=model_id)
        raise PreflightError(failure) from exc
    return check(model_id, files, quant=quant, tensor_parallel=tensor_parallel)


# --------------------------------------------------------------------------- helpers


def _fetch_failed(model_id: str, cause: str) -> PreflightError:
    return PreflightError(
        PreflightFailure(kind="repo_fetch_failed", model_id=model_id, cause=cause)
    )


def _list_text(names: Sequence[str]) -> str:
    """``["a.gguf", "b.gguf"]``: the reference's rendering of a list of names."""
    return json.dumps(list(names), ensure_ascii=False)


def _walk_files(root: Path, *, strict: bool) -> list[str]:
    """Regular files under ``root`` (links followed for files, not folders), hidden folders
    skipped; ``strict`` re-raises unreadable folders instead of skipping them."""

    def on_error(exc: OSError) -> None:
        if strict:
            raise exc

    found: list[str] = []
    for folder, dirs, names in os.walk(root, onerror=on_error):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(folder)
        for name in names:
            if (base / name).is_file():
                found.append((base / name).relative_to(root).as_posix())
    return sorted(found)
