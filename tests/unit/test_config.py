"""cortex.toml and models.toml: the reference's tables, typed validation with file, key and reason,
environment overrides, aliases (globs included), and what `cortex check-config` reports."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cortex.catalogue import Aliases
from cortex.cli import _settings_from, check_config
from cortex.config import (
    ConfigError,
    check_models,
    env_overrides,
    load_cortex_config,
    load_models,
)

CORTEX_TOML = """
models_config = "models.toml"
[gateway]
listen = "127.0.0.1:8080"
metrics_listen = "0.0.0.0:31314"
[eviction]
strategy = "lru"
defrag_after_cycles = 50
[[neurons]]
name = "beast"
endpoint = "http://beast:8081"
[nats]
url = "nats://gateway:secret@bus:4222"
"""

MODELS_TOML = """
[[models]]
id = "Qwen/Qwen3.6-27B"
harness = "torch"
quant = "Q4_K_M"
vram_mb = 54000
min_devices = 2
pinned_on = ["beast"]
residency_priority = 500
[[models]]
id = "Qwen/Qwen3-1.7B"
harness = "torch"
[aliases]
"helexa/small" = "Qwen/Qwen3-1.7B"
"claude-*" = "Qwen/Qwen3.6-27B"
"""


def write(tmp_path: Path, cortex: str = CORTEX_TOML, models: str | None = MODELS_TOML) -> Path:
    path = tmp_path / "cortex.toml"
    path.write_text(cortex)
    if models is not None:
        (tmp_path / "models.toml").write_text(models)
    return path


def test_the_references_tables_load(tmp_path: Path) -> None:
    config = load_cortex_config(write(tmp_path), environ={})
    assert config.gateway.listen == "127.0.0.1:8080"
    assert config.eviction.strategy == "lru"
    assert [n.name for n in config.neurons] == ["beast"]
    assert config.nats.url == "nats://gateway:secret@bus:4222"
    models = load_models(tmp_path / "models.toml")
    assert [m.id for m in models.models] == ["Qwen/Qwen3.6-27B", "Qwen/Qwen3-1.7B"]
    assert models.models[0].pinned_on == ["beast"] and models.models[0].min_devices == 2


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[eviction]\nstrategy = 'lru'\n", ["missing required field `gateway`"]),
        (CORTEX_TOML.replace('strategy = "lru"', 'strategy = "fifo"'),
         ["key 'eviction.strategy'", "fifo"]),
        (CORTEX_TOML.replace("defrag_after_cycles = 50", "defrag_after_cycles = -1"),
         ["key 'eviction.defrag_after_cycles'"]),
        (CORTEX_TOML.replace('name = "beast"', 'name = "be.ast"'), ["key 'neurons[0].name'"]),
        (CORTEX_TOML.replace('listen = "127.0.0.1:8080"', 'listen = "8080"'),
         ["listen address '8080' is not host:port"]),
        (CORTEX_TOML + "\n[gatway]\nlisten = 'x'\n", ["unknown field `gatway`"]),
        ("[gateway\n", ["Expected ']'"]),
    ],
)
def test_bad_files_fail_with_file_key_and_reason(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_cortex_config(path, environ={})
    message = str(info.value)
    assert message.startswith(f"failed to load config from '{path}'")
    for fragment in fragments:
        assert fragment in message


def test_a_missing_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"failed to load config from '.*nope\.toml'"):
        load_cortex_config(tmp_path / "nope.toml", environ={})


def test_environment_overrides_nest_with_double_underscores(tmp_path: Path) -> None:
    environ = {"CORTEX_GATEWAY__LISTEN": "0.0.0.0:9999", "CORTEX_EVICTION__STRATEGY": "priority",
               "CORTEX_EVICTION__DEFRAG_AFTER_CYCLES": "7", "CORTEX_PORT": "1"}
    assert env_overrides(environ) == {"gateway": {"listen": "0.0.0.0:9999"},
                                      "eviction": {"strategy": "priority",
                                                   "defrag_after_cycles": 7}}
    config = load_cortex_config(write(tmp_path), environ=environ)
    assert config.gateway.listen == "0.0.0.0:9999"
    assert (config.eviction.strategy, config.eviction.defrag_after_cycles) == ("priority", 7)


def test_flags_override_the_file_and_aliases_come_from_models_toml(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    for name in ("CORTEX_GATEWAY__LISTEN", "CORTEX_NATS__URL"):
        monkeypatch.delenv(name, raising=False)
    path = write(tmp_path)
    from_file = _settings_from(path, host=None, port=None, nats_url=None, root=None)
    assert (from_file.host, from_file.port) == ("127.0.0.1", 8080)
    assert from_file.nats_url == "nats://gateway:secret@bus:4222"
    assert from_file.catalogue.resolve("claude-sonnet-4-6") == "Qwen/Qwen3.6-27B"
    assert from_file.allowed_nodes == ("beast",)
    flagged = _settings_from(path, host="0.0.0.0", port=9000, nats_url="nats://x:4222",
                             root=None)
    assert (flagged.host, flagged.port, flagged.nats_url) == ("0.0.0.0", 9000, "nats://x:4222")


def test_a_broken_models_toml_leaves_the_catalogue_empty(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "models.toml").write_text("[[models]]\nid = 3\n")
    with caplog.at_level(logging.WARNING):
        assert load_models(tmp_path / "models.toml").models == []
    assert "catalogue is empty" in caplog.text
    assert load_models(tmp_path / "missing.toml").aliases == {}


def test_aliases_exact_then_globs_in_order_and_no_chaining() -> None:
    aliases = Aliases.of({"claude-haiku-*": "small/model", "claude-*": "big/model",
                          "helexa/small": "claude-x", "exact": "org/exact"})
    assert aliases.resolve("claude-haiku-4-5") == "small/model"
    assert aliases.resolve("claude-sonnet-4-6") == "big/model"
    assert aliases.resolve("helexa/small") == "claude-x"  # not resolved again
    assert aliases.resolve("exact") == "org/exact"
    assert aliases.resolve("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


def test_check_config_reports_duplicates_chains_and_shadows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = MODELS_TOML + """
"Qwen/Qwen3-1.7B" = "Qwen/Qwen3.6-27B"
"chained" = "helexa/small"
[[models]]
id = "Qwen/Qwen3-1.7B"
harness = "torch"
"""
    path = write(tmp_path, models=models)
    problems = check_models(tmp_path / "models.toml")
    assert any("duplicate model id 'Qwen/Qwen3-1.7B'" in p for p in problems)
    assert any("alias 'Qwen/Qwen3-1.7B' shadows" in p for p in problems)
    assert any("alias 'chained' points at the alias 'helexa/small'" in p for p in problems)
    assert check_config(config=path) == 1
    assert "duplicate model id" in capsys.readouterr().err
    write(tmp_path)
    assert check_config(config=path) == 0
    assert "ok" in capsys.readouterr().out


def test_the_shipped_examples_are_valid() -> None:
    ops = Path(__file__).resolve().parents[2] / "ops" / "config"
    config = load_cortex_config(ops / "cortex.toml", environ={})
    assert check_models(ops / config.models_config) == []
    assert load_models(ops / "models.toml").aliases["claude-*"] == "Qwen/Qwen3-8B"
