"""Load preflight (REFERENCE §6.6): classification, every refusal with its exact fields, and the
repo listings (local folders, the hub cache offline, a faked hub online). No network."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import huggingface_hub
import huggingface_hub.constants
import msgspec
import pytest

from bus_schema.messages import PreflightFailure
from neuron.errors import NeuronError
from neuron.preflight import (
    PreflightError,
    cached_snapshot_files,
    check,
    classify,
    levenshtein,
    list_hub,
    list_local,
    nearest_quant,
    preflight_hub,
    preflight_local,
    quant_token,
)

MODEL = "huggingface:Org/Name"
DENSE = ["config.json", "tokenizer.json", "model.safetensors"]
SHARDED = [
    "config.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
]
GGUF = ["README.md", ".gitattributes", "x-q6_k_p.gguf", "x-q4_k_m.gguf"]
MIXED = [*DENSE, "model-Q4_K_M.gguf"]


def _refused(fn: Any, *args: Any, **kwargs: Any) -> PreflightFailure:
    with pytest.raises(PreflightError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, NeuronError)
    return info.value.failure


# --------------------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (DENSE, "dense"),
        (SHARDED, "dense"),
        (GGUF, "gguf"),
        (["Model-Q8_0.GGUF"], "gguf"),
        (MIXED, "mixed"),
        (["README.md", "tokenizer.json", "config.json"], None),
        ([], None),
        (["pytorch_model.bin", "config.json"], None),
    ],
)
def test_classify(files: list[str], expected: str | None) -> None:
    assert classify(files) == expected


# --------------------------------------------------------------------------- check: passes


@pytest.mark.parametrize("tp", [None, 1, 2, 8])
def test_dense_without_quant_passes_at_any_tensor_parallel(tp: int | None) -> None:
    assert check(MODEL, SHARDED, quant=None, tensor_parallel=tp) == "dense"


def test_gguf_single_device_with_matching_quant_passes_case_insensitively() -> None:
    assert check(MODEL, GGUF, quant="Q6_K_P", tensor_parallel=1) == "gguf"
    assert check(MODEL, GGUF, quant="q4_k", tensor_parallel=None) == "gguf"


@pytest.mark.parametrize("quant", [None, ""])
def test_gguf_without_quant_passes(quant: str | None) -> None:
    assert check(MODEL, GGUF, quant=quant, tensor_parallel=None) == "gguf"


def test_mixed_without_quant_passes_even_with_tensor_parallel() -> None:
    assert check(MODEL, MIXED, quant=None, tensor_parallel=2) == "mixed"


def test_mixed_with_a_matching_gguf_quant_passes() -> None:
    assert check(MODEL, MIXED, quant="q4_k_m", tensor_parallel=None) == "mixed"


# --------------------------------------------------------------------------- check: refusals


@pytest.mark.parametrize("files", [[], ["README.md", "tokenizer.json"]])
def test_no_weights_is_empty_repo(files: list[str]) -> None:
    failure = _refused(check, MODEL, files, quant="q4", tensor_parallel=2)
    assert failure == PreflightFailure(kind="empty_repo", model_id=MODEL)
    assert msgspec.json.encode(failure) == (
        b'{"kind":"empty_repo","model_id":"huggingface:Org/Name"}'
    )


def test_gguf_only_with_tensor_parallel_needs_safetensors() -> None:
    failure = _refused(check, MODEL, GGUF, quant="q6_k_p", tensor_parallel=2)
    assert failure == PreflightFailure(
        kind="tp_requires_safetensors",
        model_id=MODEL,
        tp_size=2,
        gguf_quants=("x-q4_k_m.gguf", "x-q6_k_p.gguf"),
        suggestion=(
            'Set tensor_parallel=1 and pick a quant from ["x-q4_k_m.gguf", "x-q6_k_p.gguf"], '
            "or use a dense safetensors release of this model."
        ),
    )


def test_tensor_parallel_refusal_comes_before_the_quant_check() -> None:
    failure = _refused(check, MODEL, GGUF, quant="nope", tensor_parallel=4)
    assert failure.kind == "tp_requires_safetensors"
    assert failure.tp_size == 4


def test_unknown_quant_in_gguf_repo_names_the_nearest_token() -> None:
    files = ["x-q4_k_m.gguf", "x-q6_k_p.gguf"]
    with pytest.raises(PreflightError) as info:
        check(MODEL, files, quant="q6k", tensor_parallel=1)
    assert info.value.failure == PreflightFailure(
        kind="quant_not_found",
        model_id=MODEL,
        requested="q6k",
        available=("x-q4_k_m.gguf", "x-q6_k_p.gguf"),
        nearest="q6_k_p",
    )
    assert str(info.value) == (
        "quant 'q6k' not found in huggingface:Org/Name; "
        'available: ["x-q4_k_m.gguf", "x-q6_k_p.gguf"]; nearest: q6_k_p'
    )


def test_requested_quant_keeps_its_case_and_nearest_is_lowercased() -> None:
    files = ["Qwen3.6-27B-Q4_K_P.gguf", "Qwen3.6-27B-Q5_K_P.gguf", "Qwen3.6-27B-Q6_K_P.gguf"]
    failure = _refused(check, MODEL, files, quant="Q6K", tensor_parallel=None)
    assert failure.requested == "Q6K"
    assert failure.available == tuple(files)
    assert failure.nearest == "q6_k_p"


def test_mixed_repo_with_unknown_quant_applies_the_gguf_rule() -> None:
    failure = _refused(check, MODEL, MIXED, quant="q8_0", tensor_parallel=None)
    assert failure == PreflightFailure(
        kind="quant_not_found",
        model_id=MODEL,
        requested="q8_0",
        available=("model-Q4_K_M.gguf",),
        nearest="q4_k_m",
    )


def test_dense_only_repo_with_quant_is_quant_not_found_with_nothing_available() -> None:
    failure = _refused(check, MODEL, DENSE, quant="q4_k_m", tensor_parallel=2)
    assert failure == PreflightFailure(
        kind="quant_not_found", model_id=MODEL, requested="q4_k_m", available=(), nearest=None
    )
    assert msgspec.json.encode(failure) == (
        b'{"kind":"quant_not_found","model_id":"huggingface:Org/Name",'
        b'"requested":"q4_k_m","available":[]}'
    )


def test_quant_matches_the_file_name_not_its_folder() -> None:
    files = ["Q4_K_M/model-00001-of-00002.gguf", "Q4_K_M/model-00002-of-00002.gguf"]
    failure = _refused(check, MODEL, files, quant="q4_k_m", tensor_parallel=None)
    assert failure.kind == "quant_not_found"
    assert failure.available == tuple(files)
    assert failure.nearest == "00002"
    assert check(MODEL, files, quant="00001-of", tensor_parallel=None) == "gguf"


# --------------------------------------------------------------------------- tokens, distance


@pytest.mark.parametrize(
    ("file", "token"),
    [
        ("x-q6_k_p.gguf", "q6_k_p"),
        ("Qwen3.6-27B-Uncensored-HauhauCS-Aggressive-Q6_K_P.gguf", "q6_k_p"),
        ("model-IQ4_XS.gguf", "iq4_xs"),
        ("simple.gguf", "simple"),
        ("sub/dir-x/model-Q8_0.gguf", "q8_0"),
    ],
)
def test_quant_token(file: str, token: str) -> None:
    assert quant_token(file) == token


def test_nearest_quant_rules() -> None:
    candidates = ["qwen-q4_k_p.gguf", "qwen-q5_k_p.gguf", "qwen-q6_k_p.gguf", "qwen-q8_k_p.gguf"]
    assert nearest_quant("q6k", candidates) == "q6_k_p"
    assert nearest_quant("Q6K", candidates) == "q6_k_p"
    assert nearest_quant("q6k", []) is None
    assert nearest_quant("", candidates) is None
    # a tie goes to the first candidate in order
    assert nearest_quant("q", ["a-q1.gguf", "b-q2.gguf"]) == "q1"


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abc", 3),
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("q6k", "q6_k_p", 3),
        ("q6k", "q4_k_p", 4),
        ("q6_k_p", "q6k", 3),
    ],
)
def test_levenshtein(a: str, b: str, distance: int) -> None:
    assert levenshtein(a, b) == distance


# --------------------------------------------------------------------------- local listings


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_list_local_folder_gives_sorted_relative_posix_paths(tmp_path: Path) -> None:
    _touch(tmp_path, "config.json", "model.safetensors", "sub/extra.json", ".cache/hf/x.gguf",
           ".gitattributes")
    assert list_local(tmp_path) == [
        ".gitattributes", "config.json", "model.safetensors", "sub/extra.json",
    ]


def test_list_local_single_gguf_file_is_its_name(tmp_path: Path) -> None:
    _touch(tmp_path, "tiny-Q8_0.gguf")
    assert list_local(tmp_path / "tiny-Q8_0.gguf") == ["tiny-Q8_0.gguf"]


def test_list_local_missing_path_is_repo_fetch_failed(tmp_path: Path) -> None:
    failure = _refused(list_local, tmp_path / "absent")
    assert failure.kind == "repo_fetch_failed"
    assert failure.model_id == str(tmp_path / "absent")
    assert failure.cause == f"'{tmp_path / 'absent'}' does not exist"


def test_preflight_local_dense_and_gguf_folders(tmp_path: Path) -> None:
    dense, gguf = tmp_path / "dense", tmp_path / "gguf"
    _touch(dense, *SHARDED)
    _touch(gguf, "x-q4_k_m.gguf", "x-q6_k_p.gguf", "tokenizer.json")
    assert preflight_local("local/dense", dense, quant=None, tensor_parallel=2) == "dense"
    assert preflight_local("local/gguf", gguf, quant="q6_k", tensor_parallel=1) == "gguf"
    assert preflight_local("local/one", gguf / "x-q6_k_p.gguf") == "gguf"
    failure = _refused(preflight_local, "local/gguf", gguf, quant="q6k", tensor_parallel=None)
    assert failure.kind == "quant_not_found"
    assert failure.nearest == "q6_k_p"
    failure = _refused(preflight_local, "local/gguf", gguf, quant=None, tensor_parallel=2)
    assert failure.kind == "tp_requires_safetensors"


def test_preflight_local_refusals_name_the_model(tmp_path: Path) -> None:
    _touch(tmp_path / "tok", "tokenizer.json")
    assert _refused(preflight_local, "local/tok", tmp_path / "tok") == PreflightFailure(
        kind="empty_repo", model_id="local/tok"
    )
    failure = _refused(preflight_local, "local/none", tmp_path / "none")
    assert failure.kind == "repo_fetch_failed"
    assert failure.model_id == "local/none"
    assert failure.cause is not None and "does not exist" in failure.cause
    _touch(tmp_path, "notes.txt")
    assert _refused(preflight_local, "local/txt", tmp_path / "notes.txt").kind == "empty_repo"


# --------------------------------------------------------------------------- hub listings


def _hub_cache(cache: Path, repo: str, files: list[str], commit: str = "abc123") -> Path:
    """A hand-built huggingface-hub cache: blobs, snapshot links, and ``refs/main``."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / commit
    for i, name in enumerate(files):
        blob = base / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b"x")
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit + "\n")
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class _FakeApi:
    """Stands in for `huggingface_hub.HfApi`; records calls, answers or raises."""

    calls: ClassVar[list[tuple[str | None, str, str | bool | None]]] = []
    answer: ClassVar[list[str] | Exception] = []

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint

    def list_repo_files(self, repo_id: str, *, token: str | bool | None = None) -> list[str]:
        _FakeApi.calls.append((self.endpoint, repo_id, token))
        if isinstance(_FakeApi.answer, Exception):
            raise _FakeApi.answer
        return list(_FakeApi.answer)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> type[_FakeApi]:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(_FakeApi, "calls", [])
    monkeypatch.setattr(_FakeApi, "answer", [])
    return _FakeApi


@pytest.mark.usefixtures("offline")
def test_offline_hub_listing_reads_the_cached_snapshot(tmp_path: Path) -> None:
    _hub_cache(tmp_path, "Org/Name", ["config.json", "model.safetensors", "nested/tokenizer.json"])
    assert list_hub("Org/Name", cache_dir=tmp_path) == [
        "config.json", "model.safetensors", "nested/tokenizer.json",
    ]


@pytest.mark.usefixtures("offline")
def test_offline_hub_listing_skips_dangling_links(tmp_path: Path) -> None:
    snapshot = _hub_cache(tmp_path, "Pruned/Blobs", ["config.json", "model.safetensors"])
    (snapshot / "model.safetensors").resolve().unlink()
    assert list_hub("Pruned/Blobs", cache_dir=tmp_path) == ["config.json"]


@pytest.mark.usefixtures("offline")
def test_offline_hub_listing_uses_the_default_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _hub_cache(tmp_path, "Org/Tiny-GGUF", ["tiny-Q8_0.gguf"])
    assert list_hub("Org/Tiny-GGUF") == ["tiny-Q8_0.gguf"]


@pytest.mark.usefixtures("offline")
def test_offline_hub_repo_absent_from_the_cache_is_repo_fetch_failed(tmp_path: Path) -> None:
    failure = _refused(list_hub, "Org/Absent", cache_dir=tmp_path)
    assert failure.kind == "repo_fetch_failed"
    assert failure.model_id == "Org/Absent"
    assert failure.cause == (
        f"'Org/Absent' is not in the local hub cache at '{tmp_path}' "
        "and the hub is offline (HF_HUB_OFFLINE=1)"
    )
    failure = _refused(preflight_hub, MODEL, "Org/Absent", cache_dir=tmp_path)
    assert failure.model_id == MODEL
    assert failure.cause is not None and "not in the local hub cache" in failure.cause
    assert msgspec.json.decode(msgspec.json.encode(failure)).keys() == {
        "kind", "model_id", "cause",
    }


@pytest.mark.usefixtures("offline")
def test_offline_cache_without_a_usable_snapshot_is_repo_fetch_failed(tmp_path: Path) -> None:
    empty = tmp_path / "models--Empty--Repo"
    (empty / "refs").mkdir(parents=True)
    (empty / "refs" / "main").write_text("sha")
    (empty / "snapshots" / "sha").mkdir(parents=True)
    wrong_ref = tmp_path / "models--Wrong--Ref"
    (wrong_ref / "refs").mkdir(parents=True)
    (wrong_ref / "refs" / "main").write_text("missing")
    for repo in ("Empty/Repo", "Wrong/Ref"):
        assert cached_snapshot_files(tmp_path, repo) is None
        assert _refused(list_hub, repo, cache_dir=tmp_path).kind == "repo_fetch_failed"


@pytest.mark.usefixtures("offline")
def test_preflight_hub_offline_checks_the_cached_listing(tmp_path: Path) -> None:
    _hub_cache(tmp_path, "Org/Name-GGUF", ["x-q4_k_m.gguf", "x-q6_k_p.gguf"])
    _hub_cache(tmp_path, "Org/Name", SHARDED)
    gguf_id, dense_id = "huggingface:Org/Name-GGUF", "huggingface:Org/Name"
    kwargs: dict[str, Any] = {"cache_dir": tmp_path}
    assert preflight_hub(gguf_id, "Org/Name-GGUF", quant="q6_k_p", **kwargs) == "gguf"
    assert preflight_hub(dense_id, "Org/Name", tensor_parallel=2, **kwargs) == "dense"
    failure = _refused(preflight_hub, gguf_id, "Org/Name-GGUF", quant="q6k", **kwargs)
    assert failure == PreflightFailure(
        kind="quant_not_found",
        model_id=gguf_id,
        requested="q6k",
        available=("x-q4_k_m.gguf", "x-q6_k_p.gguf"),
        nearest="q6_k_p",
    )
    failure = _refused(preflight_hub, gguf_id, "Org/Name-GGUF", tensor_parallel=2, **kwargs)
    assert failure.kind == "tp_requires_safetensors"
    assert failure.model_id == gguf_id


def test_online_listing_makes_one_request_with_endpoint_and_token(
    online: type[_FakeApi], tmp_path: Path
) -> None:
    online.answer = ["b.safetensors", "a.json"]
    assert list_hub("Org/Name", endpoint="https://registry.example", token="tok",
                    cache_dir=tmp_path) == ["a.json", "b.safetensors"]
    assert online.calls == [("https://registry.example", "Org/Name", "tok")]


def test_online_listing_treats_an_empty_token_as_unset(
    online: type[_FakeApi], tmp_path: Path
) -> None:
    online.answer = DENSE
    assert preflight_hub(MODEL, "Org/Name", endpoint=None, token="", cache_dir=tmp_path) == "dense"
    assert online.calls == [(None, "Org/Name", None)]


def test_online_failure_without_a_cached_snapshot_is_repo_fetch_failed(
    online: type[_FakeApi], tmp_path: Path
) -> None:
    online.answer = ConnectionError("connection refused")
    failure = _refused(preflight_hub, MODEL, "Org/Name", cache_dir=tmp_path)
    assert failure == PreflightFailure(
        kind="repo_fetch_failed", model_id=MODEL, cause="ConnectionError: connection refused"
    )


def test_online_failure_falls_back_to_the_cached_snapshot(
    online: type[_FakeApi], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    online.answer = ConnectionError("connection refused")
    _hub_cache(tmp_path, "Org/Name", ["tiny-Q8_0.gguf"])
    assert list_hub("Org/Name", cache_dir=tmp_path) == ["tiny-Q8_0.gguf"]
    assert "using the cached snapshot" in caplog.text


def test_online_invalid_repo_id_is_repo_fetch_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the real client: it validates the id before any request is made
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    failure = _refused(list_hub, "bad id//x", endpoint="http://127.0.0.1:9", cache_dir=tmp_path)
    assert failure.kind == "repo_fetch_failed"
    assert failure.cause is not None and failure.cause.startswith("HFValidationError: ")


def test_preflight_error_messages_are_readable() -> None:
    assert str(PreflightError(PreflightFailure(
        kind="repo_fetch_failed", model_id=MODEL, cause="boom"
    ))) == "failed to list the files of 'huggingface:Org/Name': boom"
    assert "no recognised weight files" in str(
        PreflightError(PreflightFailure(kind="empty_repo", model_id=MODEL))
    )
    message = str(_tp_error())
    assert message.startswith(
        "cannot load 'huggingface:Org/Name' with tensor_parallel=2: repo is GGUF-only "
        "(2 .gguf files)"
    )
    assert message.endswith("or use a dense safetensors release of this model.")
    assert str(PreflightError(PreflightFailure(
        kind="quant_not_found", model_id=MODEL, requested="q4", available=()
    ))) == "quant 'q4' not found in huggingface:Org/Name; available: []"


def _tp_error() -> PreflightError:
    with pytest.raises(PreflightError) as info:
        check(MODEL, GGUF, quant=None, tensor_parallel=2)
    return info.value
