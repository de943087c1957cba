"""A Hugging Face hub cache written by hand (the layout huggingface-hub itself writes), so the
real loading code resolves hub ids with ``HF_HUB_OFFLINE=1`` and no network."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path


def cache_repo(cache: Path, repo_id: str, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` as the ``main`` snapshot of ``repo_id`` under ``cache``; returns the
    snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        path = snapshot / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
