"""The tokenizer wrapper: GGUF-rebuilt vocabularies must match tokenizer.json id for id."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuron.errors import ModelLoadError, UnsupportedArchitectureError
from neuron.text.tokenizer import Tokenizer, gguf_value
from tests.support.tiny_models import TinyModel, build_tiny_llama

CORPUS = (
    "The capital of France is Paris.",
    "Hello, world!  Two  spaces,\ttabs\tand\nnew\n\nlines\r\n",
    "Numbers 0 12 345 6789 3.14159 -42 1e10 2024-06-01",
    "Unicode: café naïve Straße façade Ünïcödé ñ ø å",
    "CJK: 日本語のテキスト, 中文, 한국어",
    "Emoji: 🙂🚀🎉 👩‍👩‍👧 🏳️‍🌈 and flags 🇫🇷",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<think>reasoning</think>answer<|endoftext|>",
    "code: def main():\n    return {'a': [1, 2, 3]}\n",
    "contractions: don't, I'm, we've, they'll, she'd, it's, you're",
    "   leading and trailing spaces   ",
    "",
)


@dataclass
class FakeField:
    value: object

    def contents(self, index_or_slice: int | slice = slice(None)) -> object:
        return self.value


@dataclass
class FakeReader:
    values: dict[str, object]

    @property
    def fields(self) -> Mapping[str, FakeField]:
        return {key: FakeField(value) for key, value in self.values.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tok"))


@pytest.fixture(scope="module")
def tiny_metadata(tiny: TinyModel) -> dict[str, object]:
    reader = gguf.GGUFReader(str(tiny.gguf_path))
    return {key: gguf_value(reader, key) for key in reader.fields if key.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def from_json(tiny: TinyModel) -> Tokenizer:
    return Tokenizer.from_tokenizer_json(
        tiny.folder / "tokenizer.json",
        tokenizer_config=json.loads((tiny.folder / "tokenizer_config.json").read_text()),
        generation_config=json.loads((tiny.folder / "generation_config.json").read_text()),
        model_config=json.loads((tiny.folder / "config.json").read_text()),
    )


@pytest.fixture(scope="module")
def from_gguf(tiny: TinyModel) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf.GGUFReader(str(tiny.gguf_path)))


@pytest.mark.parametrize("text", CORPUS)
def test_gguf_ids_equal_tokenizer_json_ids(
    from_json: Tokenizer, from_gguf: Tokenizer, text: str
) -> None:
    assert from_gguf.encode(text) == from_json.encode(text)
    assert from_gguf.decode(from_gguf.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(min_size=1, max_size=12),
            st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", " ", "\n"]),
        ),
        max_size=8,
    )
)
def test_gguf_ids_equal_tokenizer_json_ids_on_random_text(
    from_json: Tokenizer, from_gguf: Tokenizer, pieces: list[str]
) -> None:
    text = "".join(pieces)
    assert from_gguf.encode(text) == from_json.encode(text)


def test_special_and_added_tokens_encode_as_one_id(
    from_json: Tokenizer, from_gguf: Tokenizer
) -> None:
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        for tokenizer in (from_json, from_gguf):
            token_id = tokenizer.token_to_id(token)
            assert token_id is not None
            assert tokenizer.encode(f"a{token}b")[1:-1] == [token_id]
            assert tokenizer.decode([token_id]) == token


def test_encode_adds_no_special_tokens(from_json: Tokenizer) -> None:
    ids = from_json.encode("Paris")
    assert from_json.decode(ids) == "Paris"
    assert not set(ids) & from_json.stop_ids


def test_stop_ids_are_the_union_of_every_source(tiny: TinyModel) -> None:
    backend = Tokenizer.from_tokenizer_json(tiny.folder / "tokenizer.json")
    im_end = backend.token_to_id("<|im_end|>")
    eot = backend.token_to_id("<|endoftext|>")
    assert im_end is not None and eot is not None
    # ChatML tokens are always stop ids, even with no config at all.
    assert backend.stop_ids == {im_end, eot}
    tokenizer = Tokenizer.from_tokenizer_json(
        tiny.folder / "tokenizer.json",
        tokenizer_config={"eos_token": {"content": "<think>", "special": True}},
        generation_config={"eos_token_id": [5, 6]},
        model_config={"eos_token_id": 7},
    )
    think = tokenizer.token_to_id("<think>")
    assert tokenizer.stop_ids == {im_end, eot, think, 5, 6, 7}
    assert tokenizer.eos_token == "<think>"


def test_gguf_stop_ids_include_eos_and_eot_metadata(tiny_metadata: dict[str, object]) -> None:
    tokenizer = Tokenizer.from_gguf_metadata(
        FakeReader(
            {**tiny_metadata, "tokenizer.ggml.eos_token_id": 9, "tokenizer.ggml.eot_token_id": 11}
        ),
        generation_config={"eos_token_id": 12},
    )
    assert {9, 11, 12} <= tokenizer.stop_ids
    assert tokenizer.eos_token == tokenizer.id_to_token(9)


def test_special_token_strings_come_from_configs_then_ids(
    tiny: TinyModel, from_json: Tokenizer, from_gguf: Tokenizer
) -> None:
    assert from_json.eos_token == "<|im_end|>"
    assert from_json.special_tokens["pad_token"] == "<|endoftext|>"
    # tokenizer_config.json says bos_token: null (as Qwen's does): no bos, like transformers.
    assert from_json.bos_token is None
    assert from_gguf.bos_token == "<|im_start|>"  # llama.cpp's tokenizer.ggml.bos_token_id
    # Without a tokenizer_config.json, the config's bos id names it.
    bare = Tokenizer.from_tokenizer_json(
        tiny.folder / "tokenizer.json", generation_config={"bos_token_id": 1}
    )
    assert bare.bos_token == "<|im_start|>"
    assert from_gguf.eos_token == "<|im_end|>"
    assert from_json.stop_ids == from_gguf.stop_ids


def test_smollm_pre_tokenizer_splits_digits(tiny_metadata: dict[str, object]) -> None:
    gpt2 = Tokenizer.from_gguf_metadata(FakeReader(tiny_metadata))
    smollm = Tokenizer.from_gguf_metadata(
        FakeReader({**tiny_metadata, "tokenizer.ggml.pre": "smollm"})
    )
    text = "in 1000 and 2024"
    pieces = [smollm.decode([i]) for i in smollm.encode(text)]
    assert "".join(pieces) == text
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("10002024")
    # The tiny vocabulary has digit merges, so plain gpt-2 keeps some digits together.
    assert any(
        len(gpt2.decode([i]).strip()) > 1 and gpt2.decode([i]).strip().isdigit()
        for i in gpt2.encode(text)
    )


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_other_known_pre_tokenizers_build_and_round_trip(
    tiny_metadata: dict[str, object], pre: str
) -> None:
    tokenizer = Tokenizer.from_gguf_metadata(
        FakeReader({**tiny_metadata, "tokenizer.ggml.pre": pre})
    )
    for text in CORPUS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_sentencepiece_gguf_vocabulary_is_refused(tiny_metadata: dict[str, object]) -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"tokenizer\.json"):
        Tokenizer.from_gguf_metadata(FakeReader({**tiny_metadata, "tokenizer.ggml.model": "llama"}))


def test_unknown_pre_tokenizer_is_refused(tiny_metadata: dict[str, object]) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="pre-tokenizer 'deepseek-llm'"):
        Tokenizer.from_gguf_metadata(
            FakeReader({**tiny_metadata, "tokenizer.ggml.pre": "deepseek-llm"})
        )


def test_missing_vocabulary_is_a_load_error(tiny_metadata: dict[str, object]) -> None:
    values = {k: v for k, v in tiny_metadata.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ModelLoadError, match="merges"):
        Tokenizer.from_gguf_metadata(FakeReader(values))


def test_unreadable_tokenizer_json_is_a_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_tokenizer_json(bad)
    with pytest.raises(ModelLoadError):
        Tokenizer.from_tokenizer_json(tmp_path / "missing.json")
