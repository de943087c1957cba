"""API keys without a server: ``[auth]`` in cortex.toml, the key file, the environment and flags,
the checks on each key (whose messages never repeat it), matching and per-key limits, and the
rule that keeps a gateway without keys on loopback."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from cortex.auth import ApiKey, KeyRing, exposure_problem, is_loopback, presented_keys
from cortex.cli import _settings_from, app, check_config, serve, up
from cortex.config import ConfigError, api_keys, load_cortex_config, read_key_file
from cortex.errors import ApiError, Reason
from cortex.settings import GatewaySettings

KEY_1 = "first-key-0123456789abcdef"
KEY_2 = "second-key-0123456789abcdef"
KEY_3 = "third-key-0123456789abcdef"

BASE = """
[gateway]
listen = "0.0.0.0:31313"
[eviction]
strategy = "lru"
"""


def write(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "cortex.toml"
    path.write_text(BASE + extra)
    return path


def keys_of(path: Path, environ: dict[str, str] | None = None,
            key_file: Path | None = None) -> tuple[ApiKey, ...]:
    return api_keys(load_cortex_config(path, environ=environ or {}), path, key_file)


# ------------------------------------------------------------------ cortex.toml and key files


def test_auth_table_gives_named_limited_keys(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[auth]
api_keys = ["{KEY_1}"]
[[auth.keys]]
key = "{KEY_2}"
name = "open-webui"
models = ["Qwen/*", "helexa/small"]
max_concurrent = 2
[[auth.keys]]
key = "{KEY_3}"
""")
    first, second, third = keys_of(path)
    assert (first.key, first.name, first.models, first.max_concurrent) == (KEY_1, "key #1",
                                                                             None, None)
    assert (second.name, second.models, second.max_concurrent) == (
        "open-webui", ("Qwen/*", "helexa/small"), 2)
    assert third.name == "key #3"
    assert second.permits("Qwen/Qwen3-8B") and second.permits("helexa/small")
    assert not second.permits("meta/llama") and not second.permits("qwen/lowercase")
    assert first.permits("anything/at-all")


def test_no_auth_table_means_no_keys(tmp_path: Path) -> None:
    assert keys_of(write(tmp_path)) == ()


@pytest.mark.parametrize(
    ("value", "where", "reason"),
    [
        ('api_keys = ["short-key"]', "auth.api_keys[0]", "shorter than 16 characters"),
        ('api_keys = ["   "]', "auth.api_keys[0]", "is empty"),
        ('api_keys = [""]', "auth.api_keys[0]", "is empty"),
        ('api_keys = ["has a space in the middle"]', "auth.api_keys[0]", "whitespace"),
        ('api_keys = [" leading-space-0123456789"]', "auth.api_keys[0]", "whitespace"),
        (f'[[auth.keys]]\nkey = "{KEY_1}"\n[[auth.keys]]\nkey = "tiny"', "auth.keys[1].key",
         "shorter than 16"),
    ],
)
def test_bad_keys_stop_start_up_without_showing_them(tmp_path: Path, value: str, where: str,
                                                     reason: str) -> None:
    body = value if value.startswith("[[") else f"[auth]\n{value}"
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_cortex_config(path, environ={})
    message = str(info.value)
    assert f"(key '{where}')" in message and reason in message
    assert str(path) in message
    for secret in ("short-key", "has a space", "leading-space", "tiny"):
        assert secret not in message
    assert check_config(config=path) == 1  # `cortex check-config` catches it too


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[auth]\nunknown = 1", "auth"),
        (f'[[auth.keys]]\nkey = "{KEY_1}"\nmax_concurrent = 0', "auth.keys[0].max_concurrent"),
        (f'[[auth.keys]]\nkey = "{KEY_1}"\nname = ""', "auth.keys[0].name"),
        (f'[[auth.keys]]\nkey = "{KEY_1}"\nmodels = "Qwen/*"', "auth.keys[0].models"),
    ],
)
def test_bad_auth_tables_are_refused(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_cortex_config(write(tmp_path, extra), environ={})


def test_the_same_key_twice_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f'[auth]\napi_keys = ["{KEY_1}"]\n[[auth.keys]]\nkey = "{KEY_1}"\n'
                           'name = "ci"')
    with pytest.raises(ConfigError, match="ci is the same key as key #1") as info:
        load_cortex_config(path, environ={})
    assert KEY_1 not in str(info.value)
    key_file = tmp_path / "keys"
    key_file.write_text(f"{KEY_2}\n")
    with pytest.raises(ConfigError, match="key #2 is the same key as key #1"):
        keys_of(write(tmp_path, f'[auth]\napi_keys = ["{KEY_2}"]'), key_file=key_file)


def test_environment_overrides_carry_a_list_of_keys(tmp_path: Path) -> None:
    environ = {"CORTEX_AUTH__API_KEYS": f'["{KEY_1}", "{KEY_2}"]',
               "CORTEX_AUTH__ALLOW_UNAUTHENTICATED": "true"}
    path = write(tmp_path)
    config = load_cortex_config(path, environ=environ)
    assert config.auth.allow_unauthenticated is True
    assert [k.key for k in api_keys(config, path, None)] == [KEY_1, KEY_2]
    with pytest.raises(ConfigError, match=r"auth\.api_keys"):  # a bare key is not a list
        load_cortex_config(path, environ={"CORTEX_AUTH__API_KEYS": KEY_1})


def test_a_key_file_has_one_key_per_line_and_comments(tmp_path: Path) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text(f"# gateway keys\n\n  {KEY_1}  \n# {KEY_3} retired\n{KEY_2}\n")
    key_file.chmod(0o640)
    keys = read_key_file(key_file)
    assert [(k.key, k.name, k.models, k.max_concurrent) for k in keys] == [
        (KEY_1, "key #1", None, None), (KEY_2, "key #2", None, None)]
    # added after cortex.toml's keys, numbered on from them
    path = write(tmp_path, f'[auth]\napi_keys = ["{KEY_3}"]')
    assert [k.name for k in keys_of(path, key_file=key_file)] == ["key #1", "key #2", "key #3"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (f"{KEY_1}\nshort\n", "line 2: the API key is shorter than 16 characters"),
        (f"{KEY_1}\nkey with spaces 0123456789\n", "line 2: the API key contains whitespace"),
        ("# nothing but comments\n\n", "holds no key"),
        (f"{KEY_1}\n{KEY_1}\n", "key #2 is the same key as key #1"),
    ],
)
def test_bad_key_files_are_refused_by_line(tmp_path: Path, text: str, reason: str) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(reason)) as info:
        read_key_file(key_file)
    assert KEY_1 not in str(info.value) and "key with spaces" not in str(info.value)


def test_a_missing_key_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"failed to read API key file '.*nope'"):
        read_key_file(tmp_path / "nope")


def test_a_key_file_readable_by_everyone_is_warned_about(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "api-keys"
    key_file.write_text(KEY_1)
    key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="cortex.config"):
        read_key_file(key_file)
    assert "readable by every user" in caplog.text


def test_keys_appear_in_no_repr() -> None:
    settings = GatewaySettings(api_keys=(ApiKey(key=KEY_1, name="ops"),))
    assert KEY_1 not in repr(settings) and "ops" in repr(settings)
    with pytest.raises(ValueError, match="shorter than 16"):
        ApiKey(key="short", name="x")
    with pytest.raises(ValueError, match="configured twice"):
        GatewaySettings(api_keys=(ApiKey(key=KEY_1, name="a"), ApiKey(key=KEY_1, name="b")))


def test_the_shipped_auth_example_parses_once_uncommented(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[2] / "ops" / "config" / "cortex.toml"
    assert load_cortex_config(shipped, environ={}).auth.api_keys == []  # commented out
    uncommented = re.sub(r"^# (\[|\w+ = )", r"\1", shipped.read_text(), flags=re.MULTILINE)
    copy = tmp_path / "cortex.toml"
    copy.write_text(uncommented)
    (tmp_path / "models.toml").write_text("")
    keys = api_keys(load_cortex_config(copy, environ={}), copy, None)
    assert [(k.name, k.models, k.max_concurrent) for k in keys] == [
        ("key #1", None, None), ("open-webui", ("Qwen/Qwen3-8B",), 4)]


# ------------------------------------------------------------------ flags and the bind rule


def _flags(**kwargs: object) -> GatewaySettings:
    base: dict[str, object] = {"host": None, "port": None, "nats_url": None, "root": None}
    base.update(kwargs)
    config = base.pop("config", None)
    return _settings_from(config, **base)  # type: ignore[arg-type]


def test_without_keys_the_default_host_is_loopback(tmp_path: Path) -> None:
    settings = _flags()
    assert (settings.host, settings.api_keys) == ("127.0.0.1", ())
    key_file = tmp_path / "keys"
    key_file.write_text(KEY_1)
    keyed = _flags(api_key_file=key_file)
    assert keyed.host == "0.0.0.0"
    assert [k.key for k in keyed.api_keys] == [KEY_1]
    assert _flags(api_key_file=key_file, host="10.1.2.3").host == "10.1.2.3"


def test_the_file_can_allow_an_unauthenticated_listener(tmp_path: Path) -> None:
    settings = _flags(config=write(tmp_path, "[auth]\nallow_unauthenticated = true"))
    assert settings.host == "0.0.0.0" and settings.allow_unauthenticated
    assert not _flags(config=write(tmp_path)).allow_unauthenticated
    assert _flags(allow_unauthenticated=True).allow_unauthenticated


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False),
     ("10.0.0.5", False), ("gateway.example", False)],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_no_keys_beyond_loopback_is_refused_unless_allowed() -> None:
    problem = exposure_problem("0.0.0.0", keys=0, allow_unauthenticated=False)
    assert problem is not None
    assert "refusing to listen on 0.0.0.0 without API keys" in problem
    assert "--allow-unauthenticated" in problem and "--api-key-file" in problem
    assert exposure_problem("0.0.0.0", keys=0, allow_unauthenticated=True) is None
    assert exposure_problem("0.0.0.0", keys=1, allow_unauthenticated=False) is None
    assert exposure_problem("127.0.0.1", keys=0, allow_unauthenticated=False) is None


def test_serve_refuses_to_start_open_on_the_network(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # no ./cortex.toml
    with caplog.at_level(logging.ERROR, logger="cortex"):
        assert serve(host="0.0.0.0") == 2  # returns before starting anything
        assert serve(config=write(tmp_path)) == 2  # [gateway] listen = 0.0.0.0:31313
    assert caplog.text.count("refusing to listen on 0.0.0.0 without API keys") == 2
    key_file = tmp_path / "bad-keys"
    key_file.write_text("short\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="cortex"):
        assert serve(api_key_file=key_file) == 2
    assert "line 1: the API key is shorter than 16 characters" in caplog.text


def test_up_has_no_keys_so_it_refuses_a_network_host(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="cortex"):
        assert up(host="0.0.0.0") == 2  # returns before starting anything
    assert "refusing to listen on 0.0.0.0 without API keys" in caplog.text


def test_serve_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_API_KEY_FILE", "/etc/cortex/api-keys")
    monkeypatch.setenv("CORTEX_ALLOW_UNAUTHENTICATED", "1")
    _, bound, _ = app.parse_args(["serve"])
    assert bound.arguments["api_key_file"] == Path("/etc/cortex/api-keys")
    assert bound.arguments["allow_unauthenticated"] is True
    monkeypatch.setenv("CORTEX_API_KEY", KEY_1)
    for argv in (["status"], ["models"], ["load", "m"], ["unload", "m"], ["pin", "m"],
                 ["unpin", "m"]):
        _, bound, _ = app.parse_args(argv)
        assert bound.arguments["api_key"] == KEY_1, argv
    _, bound, _ = app.parse_args(["models", "--api-key", KEY_2])
    assert bound.arguments["api_key"] == KEY_2


# ------------------------------------------------------------------ matching and limits


def test_the_ring_matches_exact_keys_only() -> None:
    ring = KeyRing([ApiKey(key=KEY_1, name="a"), ApiKey(key=KEY_2, name="b")])
    assert ring.match(KEY_1.encode()) == 0 and ring.match(KEY_2.encode()) == 1
    for wrong in (KEY_1[:-1], KEY_1 + "0", KEY_1.upper(), "", "x" * 10_000):
        assert ring.match(wrong.encode()) is None
    assert not KeyRing([])


def test_a_keys_limit_counts_requests_in_flight() -> None:
    ring = KeyRing([ApiKey(key=KEY_1, name="a", max_concurrent=2), ApiKey(key=KEY_2, name="b")])
    ring.enter(0)
    ring.enter(0)
    with pytest.raises(ApiError) as info:
        ring.enter(0)
    assert info.value.reason is Reason.KEY_LIMIT
    assert info.value.spec.status == info.value.spec.status_for_anthropic == 429
    assert info.value.headers() == {"retry-after": "1"}
    assert ring.in_flight(0) == 2  # the refused one took nothing
    ring.leave(0)
    ring.enter(0)
    for _ in range(100):  # no limit
        ring.enter(1)
    assert ring.in_flight(1) == 100


def test_credentials_come_from_bearer_and_x_api_key() -> None:
    def scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
        return {"type": "http", "headers": list(headers)}

    assert presented_keys(scope((b"authorization", b"Bearer abc"))) == [b"abc"]  # type: ignore[arg-type]
    assert presented_keys(scope((b"authorization", b"bearer  abc "))) == [b"abc"]  # type: ignore[arg-type]
    assert presented_keys(scope((b"x-api-key", b"xyz"))) == [b"xyz"]  # type: ignore[arg-type]
    assert presented_keys(scope((b"x-api-key", b"xyz"),  # type: ignore[arg-type]
                                (b"authorization", b"Bearer abc"))) == [b"abc", b"xyz"]
    assert presented_keys(scope((b"authorization", b"Basic abc"))) == []  # type: ignore[arg-type]
    assert presented_keys(scope((b"authorization", b"Bearer"))) == []  # type: ignore[arg-type]
    assert presented_keys(scope()) == []  # type: ignore[arg-type]


def test_permission_and_limit_errors_have_their_table_rows() -> None:
    denied = ApiError(Reason.MODEL_NOT_ALLOWED, "no")
    assert (denied.spec.status, denied.spec.status_for_anthropic) == (403, 403)
    assert (denied.spec.openai_type, denied.code, denied.spec.anthropic_type) == (
        "permission_error", "model_not_allowed", "permission_error")
    limited = ApiError(Reason.KEY_LIMIT, "wait")
    assert (limited.spec.openai_type, limited.code, limited.spec.anthropic_type) == (
        "rate_limit_error", "rate_limit_exceeded", "rate_limit_error")
