"""Command lines: parsing (explicit token lists), settings validation, the status report."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.cli import format_status
from neuron.cli import build_settings


def test_status_report_matches_the_reference_layout() -> None:
    health = {"status": "ok", "nodes": {"healthy": 1, "total": 2}}
    models = {"data": [
        {"id": "helexa/small", "locations": []},
        {"id": "Qwen/Qwen3-8B", "locations": [{"node": "benjy", "status": "loaded"}]},
    ]}
    assert format_status(health, models) == (
        'Fleet health: {\n  "nodes": {\n    "healthy": 1,\n    "total": 2\n  },\n'
        '  "status": "ok"\n}\n\nModels:\n'
        "  Qwen/Qwen3-8B                            benjy(loaded)\n"
        "  helexa/small                             "
    )


def test_neuron_settings_from_flags() -> None:
    settings = build_settings(
        ["/m.gguf"], served_name="me/m", quant=None, name="beast", nats_url="nats://h:4222",
        root="cortex", device="cpu", dtype="auto", max_jobs=4, heartbeat_interval=0.5,
        hf_cache=Path("/cache"),
    )
    assert settings.name == "beast"
    assert settings.models[0].served_name == "me/m"
    assert settings.max_jobs == 4 and settings.heartbeat_interval_s == 0.5


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "bad.name"}, "invalid node name"),
        ({"served_name": "x/y", "models": ["a", "b"]}, "exactly one --model"),
        ({"max_jobs": 0}, "max_jobs"),
        ({"root": "bad root"}, "invalid subject root"),
    ],
)
def test_invalid_neuron_settings_are_refused(kwargs: dict[str, object], fragment: str) -> None:
    base: dict[str, object] = {
        "served_name": None, "quant": None, "name": "n", "nats_url": "nats://x", "root": "cortex",
        "device": "cpu", "dtype": "auto", "max_jobs": 1, "heartbeat_interval": 1.0,
        "hf_cache": None,
    }
    models = kwargs.pop("models", ["/m.gguf"])
    base.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        build_settings(models, **base)  # type: ignore[arg-type]


def test_cortex_cli_parses_up_flags() -> None:
    from cortex.cli import app

    command, bound, _ = app.parse_args(
        ["up", "--model", "/x.gguf", "--port", "9000", "--nats-port", "4333"]
    )
    assert command.__name__ == "up"
    assert bound.kwargs["model"] == Path("/x.gguf")
    assert bound.kwargs["port"] == 9000 and bound.kwargs["nats_port"] == 4333


def test_neuron_cli_reads_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from neuron.cli import app

    monkeypatch.setenv("NEURON_NATS_URL", "nats://elsewhere:4222")
    monkeypatch.setenv("NEURON_MAX_JOBS", "3")
    _, bound, _ = app.parse_args(["--model", "/a.gguf", "--model", "/b.gguf"])
    assert bound.kwargs["nats_url"] == "nats://elsewhere:4222"
    assert bound.kwargs["max_jobs"] == 3
    assert bound.kwargs["model"] == ["/a.gguf", "/b.gguf"]
