"""``neuron.toml`` (REFERENCE §2.3): every table, env and flag overrides, sources, errors that name
the file, key and reason, the ops example, and ``neuron pull`` against a hand-built hub cache."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import msgspec
import pytest

from neuron.cli import app, build_settings, serve
from neuron.config import (
    ConfigError,
    NeuronConfig,
    default_memory_budget_mb,
    load_neuron_config,
    parse_bool,
    settings_from_config,
)
from neuron.settings import ModelSpec, NeuronSettings, Source

OPS_EXAMPLE = Path(__file__).resolve().parents[2] / "ops" / "config" / "neuron.toml"
REVISION = "0123456789abcdef0123456789abcdef01234567"

FULL = """
name = "beast"
memory_budget_mb = 60000
prefill_chunk_tokens = 256
max_prompt_tokens = 8192
min_free_vram_mb = 2000
use_chat_template = false
device = "cuda:1"
dtype = "float16"
max_jobs = 4
heartbeat_interval_s = 0.5
drain_timeout_s = 5

[[harnesses]]
name = "torch"

[harness.torch]
hf_cache = "hf-cache"
default_source = "helexa"

[harness.torch.sources.helexa]
endpoint = "https://registry.helexa.ai/"
auth_env = "HELEXA_TOKEN"
cache_dir = "/archive/helexa"

[[default_models]]
model_id = "Qwen/Qwen3-0.6B-GGUF"
harness = "torch"
quant = "Q4_K_M"
tensor_parallel = 2
devices = [0, 1]
served_name = "Qwen/Qwen3-0.6B"
pinned = true

[[default_models]]
model_id = "huggingface:HuggingFaceTB/SmolLM2-135M"

[[default_models]]
model_id = "./models/tiny.gguf"

[nats]
url = "nats://neuron:secret@bus:4222"
root = "fleet1"
credentials = "neuron.creds"
"""


def _write(tmp_path: Path, text: str, name: str = "neuron.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _settings(path: Path | None, environ: dict[str, str] | None = None) -> NeuronSettings:
    env = environ or {}
    config = load_neuron_config(path, environ=env)
    return settings_from_config(config, base_dir=path.parent if path else None, environ=env)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No NEURON_* / HF_* from the machine running the tests; no ./neuron.toml in reach."""
    import os

    for name in list(os.environ):
        if name.startswith(("NEURON_", "HF_")) or name in ("XDG_CACHE_HOME",
                                                          "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# --- parsing -----------------------------------------------------------------------------------


def test_every_table_reaches_the_settings(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL)
    settings = _settings(path, {"HELEXA_TOKEN": "s3cret", "HF_TOKEN": "hf-tok"})

    assert settings.name == "beast"
    assert settings.memory_budget_mb == 60000
    assert (settings.prefill_chunk_tokens, settings.max_prompt_tokens) == (256, 8192)
    assert settings.min_free_vram_mb == 2000
    assert settings.use_chat_template is False
    assert (settings.device, settings.dtype) == ("cuda:1", "float16")
    assert (settings.max_jobs, settings.heartbeat_interval_s, settings.drain_timeout_s) == (
        4, 0.5, 5.0)
    assert settings.harnesses == ("torch",)
    assert settings.nats_url == "nats://neuron:secret@bus:4222"
    assert settings.root == "fleet1"
    assert settings.nats_credentials == tmp_path / "neuron.creds"

    assert settings.default_source == "helexa"
    helexa = settings.sources["helexa"]
    assert helexa == Source(scheme="helexa", endpoint="https://registry.helexa.ai",
                            token="s3cret", cache_dir=Path("/archive/helexa"),
                            auth_env="HELEXA_TOKEN")
    assert "s3cret" not in repr(helexa) and "hf-tok" not in repr(settings)
    hf = settings.sources["huggingface"]
    assert (hf.endpoint, hf.token, hf.cache_dir) == (
        "https://huggingface.co", "hf-tok", tmp_path / "hf-cache")
    assert settings.hf_cache == tmp_path / "hf-cache"

    assert settings.models == (
        ModelSpec(source="Qwen/Qwen3-0.6B-GGUF", served_name="Qwen/Qwen3-0.6B", quant="Q4_K_M",
                  pinned=True, tensor_parallel=2, devices=(0, 1)),
        ModelSpec(source="huggingface:HuggingFaceTB/SmolLM2-135M"),
        ModelSpec(source=str(tmp_path / "models" / "tiny.gguf")),
    )


def test_no_file_means_the_settings_defaults(tmp_path: Path) -> None:
    settings = _settings(None)
    defaults = NeuronSettings(name=settings.name)
    for field in ("nats_url", "root", "models", "device", "dtype", "max_jobs",
                  "heartbeat_interval_s", "max_prompt_tokens", "prefill_chunk_tokens",
                  "drain_timeout_s", "min_free_vram_mb", "use_chat_template", "memory_budget_mb",
                  "default_source", "harnesses", "nats_credentials", "hf_cache"):
        assert getattr(settings, field) == getattr(defaults, field), field
    assert settings.min_free_vram_mb == 1500 and settings.use_chat_template is True
    assert list(settings.sources) == ["huggingface"]
    assert settings.sources["huggingface"].auth_env == "HF_TOKEN"


def test_the_default_memory_budget_is_half_the_device() -> None:
    assert default_memory_budget_mb(81920) == 40960
    assert default_memory_budget_mb(1) == 0
    assert default_memory_budget_mb(0) == 0


def test_empty_harnesses_list_disables_the_engine_for_default_models(tmp_path: Path) -> None:
    path = _write(tmp_path, 'harnesses = []\n[[default_models]]\nmodel_id = "a/b"\n')
    with pytest.raises(ConfigError, match=r"\(key 'default_models\[0\]\.harness'\): harness "
                                          r"'torch' is not enabled"):
        load_neuron_config(path, environ={})


# --- sources -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_text", "environ", "expected"),
    [
        ('[harness.torch]\nhf_cache = "/b"\n[harness.torch.sources.huggingface]\n'
         'cache_dir = "/a"\n', {"HF_HUB_CACHE": "/c", "HF_HOME": "/d"}, "/a"),
        ('[harness.torch]\nhf_cache = "/b"\n', {"HF_HUB_CACHE": "/c", "HF_HOME": "/d"}, "/b"),
        ("", {"HF_HUB_CACHE": "/c", "HF_HOME": "/d"}, "/c"),
        ("", {"HF_HOME": "/d"}, "/d/hub"),
        ("", {"HF_HUB_CACHE": "", "HF_HOME": ""}, None),
    ],
)
def test_huggingface_cache_dir_order(
    tmp_path: Path, file_text: str, environ: dict[str, str], expected: str | None
) -> None:
    settings = _settings(_write(tmp_path, file_text), environ)
    hf = settings.sources["huggingface"]
    assert hf.cache_dir == (Path(expected) if expected else None)
    assert settings.hf_cache == hf.cache_dir


def test_huggingface_source_is_synthesized_only_when_missing(tmp_path: Path) -> None:
    own = _settings(_write(tmp_path, '[harness.torch.sources.huggingface]\n'
                                     'endpoint = "https://mirror.example"\nauth_env = "MIRROR"\n'),
                    {"MIRROR": "m", "HF_TOKEN": "h"})
    assert own.sources["huggingface"].endpoint == "https://mirror.example"
    assert own.sources["huggingface"].token == "m"
    synthesized = _settings(None, {"HF_TOKEN": "h"}).sources["huggingface"]
    assert (synthesized.endpoint, synthesized.token) == ("https://huggingface.co", "h")


def test_empty_tokens_count_as_unset(tmp_path: Path) -> None:
    path = _write(tmp_path, '[harness.torch.sources.helexa]\nendpoint = "https://h.example"\n'
                            'auth_env = "HELEXA_TOKEN"\n')
    settings = _settings(path, {"HELEXA_TOKEN": "", "HF_TOKEN": ""})
    assert settings.sources["helexa"].token is None
    assert settings.sources["huggingface"].token is None


def test_other_sources_get_their_own_cache_by_default(tmp_path: Path) -> None:
    path = _write(tmp_path, '[harness.torch.sources.helexa]\nendpoint = "https://h.example"\n')
    settings = _settings(path, {"HF_HOME": "/srv/hf"})
    assert settings.sources["helexa"].cache_dir == Path("/srv/hf/sources/helexa")
    assert settings.sources["helexa"].token is None  # no auth_env: no token at all


def test_settings_refuse_a_default_source_without_a_source() -> None:
    with pytest.raises(ValueError, match="default_source 'helexa' has no source"):
        NeuronSettings(name="n", default_source="helexa")
    assert NeuronSettings(name="n", hf_cache=Path("/c")).sources["huggingface"].cache_dir == Path(
        "/c")


# --- environment overrides ---------------------------------------------------------------------


def test_env_overrides_top_level_and_nested_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name = "file"\nmax_prompt_tokens = 100\n[nats]\nurl = "nats://f:1"\n'
                            '[harness.torch]\nhf_cache = "/file-cache"\n')
    settings = _settings(path, {
        "NEURON_NAME": "123",  # a string key keeps the text (not the TOML integer)
        "NEURON_MAX_PROMPT_TOKENS": "2048",
        "NEURON_HEARTBEAT_INTERVAL_S": "2",
        "NEURON_NATS__URL": "nats://env:4222",
        "NEURON_NATS__CREDENTIALS": "/etc/n.creds",
        "NEURON_HARNESS__TORCH__HF_CACHE": "/env-cache",
        "NEURON_HARNESS__TORCH__SOURCES__HELEXA__ENDPOINT": "https://h.example",
        "NEURON_MEMORY_BUDGET_MB": "30000",
    })
    assert settings.name == "123"
    assert settings.max_prompt_tokens == 2048
    assert settings.heartbeat_interval_s == 2.0
    assert settings.nats_url == "nats://env:4222"
    assert settings.nats_credentials == Path("/etc/n.creds")
    assert settings.hf_cache == Path("/env-cache")
    assert settings.sources["helexa"].endpoint == "https://h.example"
    assert settings.memory_budget_mb == 30000


def test_command_line_only_variables_do_not_break_a_strict_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "max_jobs = 3\n")
    env = {"NEURON_LOG_LEVEL": "debug", "NEURON_MODEL": "/x.gguf", "NEURON_NATS_URL": "bad",
           "NEURON_HF_CACHE": "/x", "NEURON_HEARTBEAT_INTERVAL": "9", "NEURON_CONFIG": "x",
           "NEURON_NATS__NOPE": "1", "NEURON_HARNESS__CANDLE__HF_CACHE": "/y"}
    config = load_neuron_config(path, environ=env)
    assert config.max_jobs == 3
    assert config.nats.url == "nats://127.0.0.1:4222"
    assert config.heartbeat_interval_s == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("false", False), ("0", False), ("no", False), ("off", False), ("OFF", False),
     ("true", True), ("1", True), ("yes", True), ("on", True), ("On", True)],
)
def test_use_chat_template_env_booleans(text: str, expected: bool) -> None:
    config = load_neuron_config(None, environ={"NEURON_USE_CHAT_TEMPLATE": text})
    assert config.use_chat_template is expected
    assert parse_bool(text) is expected


def test_a_bad_env_value_names_the_key_and_the_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load_neuron_config(path, environ={"NEURON_USE_CHAT_TEMPLATE": "maybe"})
    assert str(info.value).startswith(
        f"failed to load config from '{path}' (key 'use_chat_template', set by "
        "NEURON_USE_CHAT_TEMPLATE): Expected `bool`, got `str`")
    with pytest.raises(ConfigError, match=r"^invalid neuron configuration \(key 'max_jobs', set by "
                                          r"NEURON_MAX_JOBS\): Expected `int` >= 1"):
        load_neuron_config(None, environ={"NEURON_MAX_JOBS": "0"})


# --- bad files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("max_job = 3\n", "max_job", "unknown field `max_job`"),
        ('[nats]\nurl = "nats://x:1"\nuser = "x"\n', "nats.user", "unknown field `user`"),
        ('max_jobs = "four"\n', "max_jobs", "Expected `int`, got `str`"),
        ("prefill_chunk_tokens = 0\n", "prefill_chunk_tokens", "Expected `int` >= 1"),
        ("min_free_vram_mb = -1\n", "min_free_vram_mb", "Expected `int` >= 0"),
        ('use_chat_template = "off"\n', "use_chat_template", "Expected `bool`, got `str`"),
        ('dtype = "int4"\n', "dtype", "Invalid enum value 'int4'"),
        ('device = "tpu"\n', "device", "unknown device 'tpu'"),
        ('name = "bad.name"\n', "name", "invalid node name"),
        ('[nats]\nroot = "bad root"\n', "nats.root", "invalid subject root"),
        ('[nats]\nurl = "http://x:1"\n', "nats.url", "unsupported NATS URL scheme 'http'"),
        ('[[harnesses]]\nname = "candle"\n', "harnesses[0].name", "Invalid enum value 'candle'"),
        ("[harness.candle]\n", "harness.candle", "unknown field `candle`"),
        ('[[default_models]]\nmodel_id = "a/b"\n[[default_models]]\nmodel_id = "c/d"\nquant = 4\n',
         "default_models[1].quant", "Expected `str | null`, got `int`"),
        ('[[default_models]]\nmodel_id = "a/b"\ntensor_parallel = 2\ndevices = [0]\n',
         "default_models[0].devices", "1 devices listed for tensor_parallel = 2"),
        ('[[default_models]]\nmodel_id = "a/b"\ndevices = [-1]\n', "default_models[0].devices[0]",
         "Expected `int` >= 0"),
        ('[[default_models]]\nmodel_id = "justname"\n', "default_models[0].model_id",
         "parse model id 'justname' as scheme:org/name: model id 'justname' is missing the '/' "
         "between org and name"),
        ('[[default_models]]\nmodel_id = "helexa:a/b"\n', "default_models[0].model_id",
         "no source configured for scheme 'helexa'; configured: ['huggingface']. Add a "
         "[harness.torch.sources.helexa] block to neuron.toml with endpoint = '...'"),
        ('[harness.torch]\ndefault_source = "helexa"\n', "harness.torch.default_source",
         "no source configured for scheme 'helexa'"),
        ('[harness.torch.sources.helexa]\nauth_env = "T"\n',
         "harness.torch.sources.helexa.endpoint", "source 'helexa' needs an endpoint"),
        ('[harness.torch.sources.helexa]\nendpoint = "https://h"\ntoken = "x"\n',
         "harness.torch.sources.helexa.token", "unknown field `token`"),
        ('[harness.torch.sources.helexa]\nendpoint = 5\n', "harness.torch.sources.helexa.endpoint",
         "Expected `str | null`, got `int`"),
    ],
)
def test_bad_files_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_neuron_config(path, environ={})
    message = str(info.value)
    assert message.startswith(f"failed to load config from '{path}' (key '{key}'): "), message
    assert reason in message


def test_unparseable_and_missing_files_name_the_file(tmp_path: Path) -> None:
    broken = _write(tmp_path, "name = \n")
    with pytest.raises(ConfigError, match=rf"^failed to load config from '{re.escape(str(broken))}'"
                                          r": Invalid value"):
        load_neuron_config(broken, environ={})
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=rf"^failed to load config from "
                                          rf"'{re.escape(str(missing))}': No such file"):
        load_neuron_config(missing, environ={})


# --- the ops example ---------------------------------------------------------------------------


def _keys(kind: type[msgspec.Struct]) -> set[str]:
    import msgspec.inspect as mi

    found: set[str] = set()

    def walk(node: mi.Type) -> None:
        if isinstance(node, mi.StructType):
            for field in node.fields:
                found.add(field.encode_name)
                walk(field.type)
        elif isinstance(node, mi.UnionType):
            for member in node.types:
                walk(member)
        elif isinstance(node, mi.ListType):
            walk(node.item_type)
        elif isinstance(node, mi.DictType):
            walk(node.value_type)

    walk(mi.type_info(kind))
    return found


def test_the_ops_example_parses_and_documents_every_key() -> None:
    config = load_neuron_config(OPS_EXAMPLE, environ={})
    assert config.name == "beast"
    assert config.default_models[0].quant == "Q4_K_M"
    assert config.harness.torch.hf_cache == "/var/lib/neuron/hf-cache"
    text = OPS_EXAMPLE.read_text()
    undocumented = sorted(  # each key as `key =` (maybe commented out) or in a [table] header
        k for k in _keys(NeuronConfig)
        if not re.search(rf"(^|^#\s*|\[\[?|\.){k}(\s*=|\]|\.)", text, re.MULTILINE))
    assert undocumented == []
    # The commented-out blocks parse too once uncommented.
    uncommented = re.sub(r"^# (\[|\w+ = )", r"\1", text, flags=re.MULTILINE)
    full = msgspec.convert(__import__("tomllib").loads(uncommented), NeuronConfig, strict=True)
    assert full.harness.torch.sources["helexa"].endpoint == "https://registry.helexa.ai"
    assert full.nats.credentials == "/etc/cortex/neuron.creds"
    assert full.default_models[0].devices == [0, 1]


# --- flags -------------------------------------------------------------------------------------


def test_flags_override_env_which_overrides_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'max_jobs = 4\nuse_chat_template = true\nprefill_chunk_tokens = 64\n'
                            '[[default_models]]\nmodel_id = "a/from-file"\n')
    env = {"NEURON_MAX_JOBS": "8", "NEURON_USE_CHAT_TEMPLATE": "off",
           "NEURON_PREFILL_CHUNK_TOKENS": "128"}
    from_env = build_settings([], config_path=path, environ=env)
    assert (from_env.max_jobs, from_env.use_chat_template, from_env.prefill_chunk_tokens) == (
        8, False, 128)
    assert [m.source for m in from_env.models] == ["a/from-file"]

    flagged = build_settings(
        ["/flag.gguf"], quant="Q8_0", config_path=path, environ=env, max_jobs=2,
        use_chat_template=True, min_free_vram_mb=0, memory_budget_mb=1234,
        max_prompt_tokens=999, hf_cache=Path("rel-cache"),
    )
    assert (flagged.max_jobs, flagged.use_chat_template, flagged.prefill_chunk_tokens) == (
        2, True, 128)
    assert (flagged.min_free_vram_mb, flagged.memory_budget_mb, flagged.max_prompt_tokens) == (
        0, 1234, 999)
    assert flagged.models == (ModelSpec(source="/flag.gguf", quant="Q8_0"),)
    assert flagged.hf_cache == Path.cwd() / "rel-cache"  # flags: relative to the working dir


def test_a_bad_flag_is_named_as_a_flag(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"\(key 'max_jobs', set by a command-line flag\)"):
        build_settings([], config_path=path, environ={}, max_jobs=0)


def test_cli_flags_parse_including_the_chat_template_negation(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, bound, _ = app.parse_args(["-c", "n.toml", "--no-use-chat-template",
                                  "--prefill-chunk-tokens", "32", "--max-prompt-tokens", "64",
                                  "--min-free-vram-mb", "0", "--memory-budget-mb", "500"])
    assert bound.kwargs == {"config": Path("n.toml"), "use_chat_template": False,
                            "prefill_chunk_tokens": 32, "max_prompt_tokens": 64,
                            "min_free_vram_mb": 0, "memory_budget_mb": 500}
    monkeypatch.setenv("NEURON_USE_CHAT_TEMPLATE", "off")
    assert app.parse_args([])[1].kwargs == {"use_chat_template": False}
    assert app.parse_args(["--use-chat-template"])[1].kwargs == {"use_chat_template": True}


def test_serve_exits_2_on_a_bad_config(
    clean_env: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path, "max_jobs = 0\n")
    with caplog.at_level(logging.ERROR, logger="neuron"):
        assert serve(config=path) == 2
    assert f"failed to load config from '{path}' (key 'max_jobs')" in caplog.text
    with caplog.at_level(logging.ERROR, logger="neuron"):
        assert serve(config=tmp_path / "absent.toml") == 2
    assert "absent.toml': No such file" in caplog.text


# --- neuron pull -------------------------------------------------------------------------------


def _hub_cache(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """What huggingface-hub writes: models--Org--Name/{refs/main, snapshots/<rev>/...}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(REVISION)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


_DENSE = {"config.json": "{}", "tokenizer.json": "{}", "model.safetensors": ""}


def _pull(argv: list[str]) -> int:
    result = app(["pull", *argv], result_action="return_value")
    assert isinstance(result, int)
    return result


def test_pull_prints_the_cached_folder_offline(
    clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = _hub_cache(tmp_path / "hf", "Org/Name", _DENSE)
    helexa = _hub_cache(tmp_path / "helexa", "Org/Name",
                        {"tok.json": "{}", "m-Q4_K_M.gguf": "", "m-Q8_0.gguf": ""})
    config = _write(tmp_path, '[harness.torch]\nhf_cache = "hf"\n'
                              '[harness.torch.sources.helexa]\nendpoint = "https://h.example"\n'
                              'cache_dir = "helexa"\n')

    assert _pull(["Org/Name", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == str(hf)
    assert _pull(["huggingface:Org/Name", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == str(hf)
    assert _pull(["helexa:Org/Name", "--quant", "q8_0", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == str(helexa)


def test_pull_uses_the_default_config_in_the_working_directory(
    clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _hub_cache(tmp_path / "cache", "Org/Name", _DENSE)
    _write(tmp_path, '[harness.torch]\nhf_cache = "cache"\n')
    assert _pull(["Org/Name"]) == 0
    assert capsys.readouterr().out.strip() == str(snapshot)


def test_pull_errors(
    clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(tmp_path / "hf", "Org/Ggufs", {"m-Q4_K_M.gguf": ""})
    config = _write(tmp_path, '[harness.torch]\nhf_cache = "hf"\n')

    assert _pull(["helexa:Org/Name", "-c", str(config)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        "Error: no source configured for scheme 'helexa'; configured: ['huggingface']. Add a "
        "[harness.torch.sources.helexa] block to neuron.toml with endpoint = '...'\n")

    assert _pull(["Org/Absent", "-c", str(config)]) == 1
    assert capsys.readouterr().err.startswith("Error: 'Org/Absent' is not in the local hub cache")

    assert _pull(["Org/Ggufs", "--quant", "Q8_0", "-c", str(config)]) == 1
    assert "no GGUF file matches quant 'Q8_0'" in capsys.readouterr().err

    assert _pull(["justname", "-c", str(config)]) == 1
    assert capsys.readouterr().err == (
        "Error: parse model id 'justname' as scheme:org/name: model id 'justname' is missing "
        "the '/' between org and name\n")

    bad = _write(tmp_path, "max_jobs = 0\n", "bad.toml")
    assert _pull(["Org/Name", "-c", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"Error: failed to load config from '{bad}'")
