"""Model resolution: local files and folders, and the Hugging Face hub cache offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuron.errors import ModelSourceError
from neuron.settings import Source
from neuron.sources import (
    ModelIdError,
    ModelSourceId,
    local_model_files,
    pick_gguf,
    pull_model,
    resolve_model,
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty model id"),
        ("justname", "model id 'justname' is missing the '/' between org and name"),
        (":a/b", "model id ':a/b' has an empty scheme before ':'"),
        ("/name", "model id '/name' has an empty org"),
        ("org/", "model id 'org/' has an empty name"),
        ("hugg/ingface:Q/N",
         "model id 'hugg/ingface:Q/N' has a scheme containing '/' which is reserved for org/name"),
        ("huggingface:Q/N:weird",
         "model id 'huggingface:Q/N:weird' has a name containing ':' which is reserved for the "
         "scheme prefix"),
    ],
)
def test_model_id_errors_use_the_reference_messages(text: str, message: str) -> None:
    with pytest.raises(ModelIdError) as info:
        ModelSourceId.parse(text)
    assert str(info.value) == message


def test_model_id_round_trips_and_defaults_the_scheme() -> None:
    parsed = ModelSourceId.parse("huggingface:Qwen/Qwen3-8B")
    assert str(parsed) == "huggingface:Qwen/Qwen3-8B"
    bare = ModelSourceId.parse("Qwen/Qwen3-8B/extra")
    assert bare.repo_path() == "Qwen/Qwen3-8B/extra"
    assert bare.with_default_scheme("helexa").scheme == "helexa"
    assert parsed.with_default_scheme("helexa").scheme == "huggingface"


def _dense(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (folder / name).write_text("{}")
    return folder


def test_local_dense_folder(tmp_path: Path) -> None:
    folder = _dense(tmp_path / "m")
    files = local_model_files(folder, "local/m")
    assert files.format == "safetensors"
    assert files.weights == (folder / "model.safetensors",)
    assert files.tokenizer == folder / "tokenizer.json"
    assert files.chat_template is None


def test_sharded_checkpoint_lists_every_shard_once(tmp_path: Path) -> None:
    folder = _dense(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00002-of-00002.safetensors",'
        ' "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}'
    )
    files = local_model_files(folder, "local/m")
    assert [p.name for p in files.weights] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_gguf_quant_is_picked_case_insensitively(tmp_path: Path) -> None:
    names = ["x-Q4_K_M.gguf", "x-Q6_K.gguf"]
    paths = [tmp_path / n for n in names]
    assert pick_gguf(paths, "q6_k") == paths[1]
    with pytest.raises(ModelSourceError, match="no GGUF file matches quant 'q8_0'"):
        pick_gguf(paths, "q8_0")


def test_empty_folder_and_missing_path_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="holds no model weights"):
        local_model_files(tmp_path, "local/x")
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_local_paths_are_served_under_local_names(tmp_path: Path) -> None:
    gguf = tmp_path / "Tiny-Q8_0.gguf"
    gguf.write_bytes(b"")
    resolved = resolve_model(str(gguf))
    assert resolved.source == "file"
    assert resolved.files.model_id == "local/Tiny-Q8_0"
    assert resolve_model(str(gguf), served_name="me/tiny").files.model_id == "me/tiny"


def _hub_cache(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """The layout huggingface-hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = base / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_hub_ids_resolve_from_the_local_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _hub_cache(tmp_path, "org/Tiny-GGUF",
                          {"tiny-q4_k_m.gguf": "", "tiny-q8_0.gguf": "", "tokenizer.json": "{}"})
    resolved = resolve_model("huggingface:org/Tiny-GGUF", quant="Q8_0", cache_dir=tmp_path)
    assert resolved.source == "huggingface"
    assert resolved.files.model_id == "org/Tiny-GGUF"
    assert resolved.files.weights == (snapshot / "tiny-q8_0.gguf",)


def test_hub_id_missing_from_the_cache_offline_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not in the local hub cache"):
        resolve_model("org/absent", cache_dir=tmp_path)


def test_unknown_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no source configured for scheme 'helexa'"):
        resolve_model("helexa:org/name", cache_dir=tmp_path)


def test_unknown_scheme_message_is_the_references(tmp_path: Path) -> None:
    sources = {"huggingface": Source(scheme="huggingface", endpoint="https://huggingface.co"),
               "helexa": Source(scheme="helexa", endpoint="https://h.example")}
    with pytest.raises(ModelSourceError) as info:
        resolve_model("other:org/name", sources=sources)
    assert str(info.value) == (
        "no source configured for scheme 'other'; configured: ['helexa', 'huggingface']. Add a "
        "[harness.torch.sources.other] block to neuron.toml with endpoint = '...'")


def test_bad_ids_use_the_neurons_wording() -> None:
    with pytest.raises(ModelIdError) as info:
        resolve_model("justname")
    assert str(info.value) == ("parse model id 'justname' as scheme:org/name: model id 'justname' "
                               "is missing the '/' between org and name")


class _FakeDownload:
    """Stands in for huggingface_hub.snapshot_download: records the call, returns a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls: list[tuple[str, dict[str, object]]] = []

    def __call__(self, repo_id: str, **kwargs: object) -> str:
        self.calls.append((repo_id, kwargs))
        return str(self.folder)


@pytest.fixture
def fake_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _FakeDownload:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    fake = _FakeDownload(_dense(tmp_path / "snapshot"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def test_a_configured_source_downloads_from_its_endpoint(fake_download: _FakeDownload) -> None:
    sources = {
        "huggingface": Source(scheme="huggingface", endpoint="https://huggingface.co"),
        "helexa": Source(scheme="helexa", endpoint="https://h.example", token="tok",
                         cache_dir=Path("/c/helexa")),
        "open": Source(scheme="open", endpoint="https://o.example"),
    }
    resolved = resolve_model("Org/Name", sources=sources, default_source="helexa")
    assert resolved.source == "helexa"
    assert resolved.files.model_id == "Org/Name"
    repo, kwargs = fake_download.calls[-1]
    assert repo == "Org/Name"
    assert (kwargs["endpoint"], kwargs["token"], kwargs["cache_dir"]) == (
        "https://h.example", "tok", "/c/helexa")
    assert kwargs["local_files_only"] is False

    resolve_model("open:Org/Name", sources=sources)
    # No token for another registry sends none, never huggingface-hub's stored login.
    assert fake_download.calls[-1][1]["token"] is False
    resolve_model("Org/Name", sources=sources)
    hf_kwargs = fake_download.calls[-1][1]
    assert hf_kwargs["token"] is None  # huggingface: the hub's own token lookup
    assert hf_kwargs["endpoint"] == "https://huggingface.co"


def test_legacy_cache_dir_and_offline_env(
    fake_download: _FakeDownload, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve_model("Org/Name", cache_dir=Path("/legacy"))
    assert fake_download.calls[-1][1]["cache_dir"] == "/legacy"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = pull_model("Org/Name")
    assert folder == fake_download.folder
    assert fake_download.calls[-1][1]["local_files_only"] is True


def test_pull_refuses_local_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="is a local path"):
        pull_model(str(tmp_path))
