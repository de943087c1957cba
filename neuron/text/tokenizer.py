"""Tokenizer for the torch engine: a thin wrapper around `tokenizers.Tokenizer`.

A model's tokenizer comes either from its ``tokenizer.json`` or, for GGUF files without one, from
the GGUF metadata (``tokenizer.ggml.*``), rebuilt as a byte-level BPE that matches llama.cpp's ids
for the pre-tokenizers we know. The wrapper also knows the model's special token strings (for
chat templates) and the set of ids that end a generation (REFERENCE §6.3).

This module never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from neuron.errors import ModelLoadError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

#: Token strings that end a turn in ChatML-style models; always stop ids when present.
CHATML_STOP_TOKENS: Final = ("<|im_end|>", "<|endoftext|>")

# Special token variables templates see, as tokenizer_config.json names them.
_SPECIAL_TOKEN_KEYS: Final = ("bos_token", "eos_token", "unk_token", "pad_token")
# GGUF token types (gguf.TokenType); CONTROL and USER_DEFINED become added tokens.
_TOKEN_TYPE_CONTROL: Final = 3
_TOKEN_TYPE_USER_DEFINED: Final = 4

_GPT2_REGEX: Final = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFField(Protocol):
    """The part of `gguf.ReaderField` this module uses."""

    def contents(self, index_or_slice: int | slice = ...) -> object:
        """The field's decoded value."""
        ...


class GGUFMetadata(Protocol):
    """The part of `gguf.GGUFReader` this module uses (its metadata fields)."""

    @property
    def fields(self) -> Mapping[str, GGUFField]:
        """Metadata fields by key."""
        ...


def gguf_value(reader: GGUFMetadata, key: str) -> object:
    """Return the decoded value of GGUF metadata ``key``, or None when absent.

    Raises:
        ModelLoadError: the value is not valid UTF-8 text.
    """
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"GGUF metadata '{key}' is not valid UTF-8: {exc}") from exc


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _int_ids(value: object) -> list[int]:
    """An ``eos_token_id`` as configs write it: an int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Encodes rendered prompts and decodes generated ids for one model.

    Thread-safe: encoding and decoding do not mutate state.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        """Wrap ``backend``.

        Args:
            backend: the `tokenizers` tokenizer.
            special_tokens: template variables such as ``bos_token`` / ``eos_token`` (strings).
            extra_stop_ids: ids that end a generation besides ``<|im_end|>`` / ``<|endoftext|>``
                and ``eos_token``.
        """
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        stop: set[int] = set()
        for token in (*CHATML_STOP_TOKENS, self.special_tokens.get("eos_token")):
            token_id = backend.token_to_id(token) if token else None
            if token_id is not None:
                stop.add(token_id)
        stop.update(i for i in extra_stop_ids if 0 <= i < self._vocab_size)
        self.stop_ids: frozenset[int] = frozenset(stop)

    @classmethod
    def from_tokenizer_json(
        cls,
        path: Path,
        *,
        tokenizer_config: Mapping[str, object] | None = None,
        generation_config: Mapping[str, object] | None = None,
        model_config: Mapping[str, object] | None = None,
    ) -> Tokenizer:
        """Load ``tokenizer.json``; the optional configs supply special tokens and eos ids.

        Raises:
            ModelLoadError: the file is missing or malformed.
        """
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for bad files
            raise ModelLoadError(f"cannot load tokenizer {path}: {exc}") from exc
        special, configured = _configured_special_tokens(tokenizer_config)
        eos_ids = [
            *_int_ids((generation_config or {}).get("eos_token_id")),
            *_int_ids((model_config or {}).get("eos_token_id")),
        ]
        bos_ids = [
            *_int_ids((generation_config or {}).get("bos_token_id")),
            *_int_ids((model_config or {}).get("bos_token_id")),
        ]
        _fill_special_from_ids(backend, special, configured, "eos_token", eos_ids)
        _fill_special_from_ids(backend, special, configured, "bos_token", bos_ids)
        return cls(backend, special_tokens=special, extra_stop_ids=eos_ids)

    @classmethod
    def from_gguf_metadata(
        cls,
        reader: GGUFMetadata,
        *,
        tokenizer_config: Mapping[str, object] | None = None,
        generation_config: Mapping[str, object] | None = None,
    ) -> Tokenizer:
        """Rebuild the tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata.

        Supports byte-level BPE vocabularies (``tokenizer.ggml.model = gpt2``) with the
        pre-tokenizers ``gpt-2``, ``smollm`` (and the other starcoder-style ones), ``llama-bpe``
        and ``qwen2``.

        Raises:
            UnsupportedArchitectureError: a vocabulary or pre-tokenizer we cannot reproduce.
            ModelLoadError: the metadata is missing or malformed.
        """
        model = gguf_value(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedArchitectureError(
                f"tokenizer {model!r}",
                "torch",
                "only byte-level BPE vocabularies (tokenizer.ggml.model = gpt2) can be rebuilt "
                "from GGUF metadata; provide the model's tokenizer.json instead",
            )
        pre = gguf_value(reader, "tokenizer.ggml.pre")
        pre_name = pre if isinstance(pre, str) else "default"
        tokens = gguf_value(reader, "tokenizer.ggml.tokens")
        merges = gguf_value(reader, "tokenizer.ggml.merges")
        token_types = gguf_value(reader, "tokenizer.ggml.token_type")
        if not isinstance(tokens, list) or not isinstance(merges, list):
            raise ModelLoadError("GGUF metadata lacks tokenizer.ggml.tokens or .merges")
        types: list[object] = token_types if isinstance(token_types, list) else []
        backend = _byte_level_bpe(
            [str(t) for t in tokens], [str(m) for m in merges], types, pre_name
        )

        special, configured = _configured_special_tokens(tokenizer_config)
        gguf_ids: dict[str, list[int]] = {}
        for key, meta in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ):
            gguf_ids[key] = _int_ids(gguf_value(reader, f"tokenizer.ggml.{meta}"))
            _fill_special_from_ids(backend, special, configured, key, gguf_ids[key])
        eos_ids = [
            *gguf_ids["eos_token"],
            *_int_ids(gguf_value(reader, "tokenizer.ggml.eot_token_id")),
            *_int_ids((generation_config or {}).get("eos_token_id")),
        ]
        return cls(backend, special_tokens=special, extra_stop_ids=eos_ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._vocab_size

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token string, if the model has one."""
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token string, if the model has one."""
        return self.special_tokens.get("eos_token")

    def encode(self, text: str) -> list[int]:
        """Tokenise ``text`` without adding special tokens (templates already contain them)."""
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Decode ``ids``; invalid or incomplete UTF-8 becomes U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (a vocabulary or added token string), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of ``token_id``, or None when out of range."""
        return self._backend.id_to_token(token_id)


def _configured_special_tokens(
    tokenizer_config: Mapping[str, object] | None,
) -> tuple[dict[str, str], frozenset[str]]:
    """Special token strings from tokenizer_config.json, and the keys it sets (even to null)."""
    config = tokenizer_config or {}
    special: dict[str, str] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        content = _token_content(config.get(key))
        if content is not None:
            special[key] = content
    return special, frozenset(key for key in _SPECIAL_TOKEN_KEYS if key in config)


def _fill_special_from_ids(
    backend: tokenizers.Tokenizer,
    special: dict[str, str],
    configured: frozenset[str],
    key: str,
    ids: Sequence[int],
) -> None:
    """Set ``special[key]`` from the first id in ``ids`` unless tokenizer_config.json set it
    (an explicit null, as Qwen writes for ``bos_token``, means the model has none)."""
    if key in configured or key in special or not ids:
        return
    token = backend.id_to_token(ids[0])
    if token is not None:
        special[key] = token


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None]:
    """The `tokenizers` pipeline equivalent to llama.cpp's pre-tokenizer ``pre``."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None
    if pre in ("smollm", "starcoder", "refact", "command-r", "codeshell"):
        # llama.cpp: "\p{N}" (each digit alone), then the gpt-2 regex.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ), None
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level]), None
    if pre in ("qwen2", "stablelm2"):
        split = pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level]), normalizers.NFC()
    raise UnsupportedArchitectureError(
        f"pre-tokenizer {pre!r}",
        "torch",
        "this GGUF pre-tokenizer cannot be rebuilt; provide the model's tokenizer.json instead",
    )


def _byte_level_bpe(
    tokens: list[str], merges: list[str], token_types: Sequence[object], pre: str
) -> tokenizers.Tokenizer:
    """Build a byte-level BPE tokenizer from a GGUF vocabulary."""
    pre_tokenizer, normalizer = _pre_tokenizer(pre)
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelLoadError(f"malformed GGUF merge {merge!r}")
        pairs.append((left, right))
    # llama.cpp matches whole words against the vocabulary first for llama-bpe (ignore_merges).
    ignore_merges = pre in ("llama-bpe", "llama3")
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
    )
    backend.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.decoder = decoders.ByteLevel()
    added: list[AddedToken] = []
    for token_id, token_type in enumerate(token_types):
        if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
            added.append(
                AddedToken(
                    tokens[token_id],
                    special=token_type == _TOKEN_TYPE_CONTROL,
                    normalized=False,
                )
            )
    if added:
        # Tokens already in the vocabulary keep their ids.
        backend.add_special_tokens([t for t in added if t.special])
        backend.add_tokens([t for t in added if not t.special])
    logger.debug(
        "rebuilt GGUF tokenizer: %d tokens, %d merges, %d added, pre=%s",
        len(tokens),
        len(pairs),
        len(added),
        pre,
    )
    return backend
