"""A tiny random-weight Llama GGUF with a SentencePiece ("llama") vocabulary, built on the fly.

The vocabulary is laid out like Llama 2's: ``<unk>``, ``<s>``, ``</s>``, the 256 byte-fallback
tokens ``<0x00>``..``<0xFF>``, then ``▁``-prefixed pieces with scores. The pieces are every
character of a small corpus plus every prefix of every ``▁word`` in it, so the score-driven
bigram merges of llama.cpp's SentencePiece tokenizer can build whole words; anything else falls
back to byte tokens. Weights are the same seeded random draw as `tests.support.tiny_models`
(2 layers, hidden 64, grouped-query attention, an untied head: the llama.cpp inside
ctransformers requires ``output.weight``).

`build_tiny_gpt2_ggml` writes a legacy (pre-GGUF) GGML file of a tiny GPT-2 in the format of
ggml's ``examples/gpt-2`` converter, which ctransformers loads with ``model_type="gpt2"``.

Only numpy and gguf are used; building takes a few milliseconds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import gguf
import numpy as np

from neuron.engines.base import ModelFiles
from tests.support.tiny_models import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    LAYERS,
    RMS_EPS,
    ROPE_THETA,
    _gguf_name,
    _random_weights,
    llama_permute,
)

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
#: Byte-fallback tokens start at this id (after ``<unk>``, ``<s>``, ``</s>``).
BYTE_OFFSET: Final = 3
SPIECE_SPACE: Final = "▁"

#: A Llama-2-style chat template (simplified): ``<s>[INST] user [/INST] assistant</s>``.
LLAMA2_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

_CORPUS: Final = (
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello, world! How are you today? I am fine, thank you very much.",
    "A quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "[INST] What is the capital of France? [/INST] The capital of France is Paris.",
    "<<SYS>> You are a tiny test model. <</SYS>>",
    "Large language models predict the next token from the previous tokens.",
)

GGUFTensorType = Literal["F32", "F16", "Q8_0"]


@dataclass(frozen=True)
class TinySentencePiece:
    """Where the built GGUF lies, and facts tests need."""

    gguf_path: Path
    model_id: str
    vocab_size: int
    context_length: int
    tokens: tuple[str, ...]
    bos_id: int
    eos_id: int

    def files(self) -> ModelFiles:
        """`ModelFiles` for the GGUF alone (tokenizer and template from its metadata)."""
        return ModelFiles(model_id=self.model_id, format="gguf", weights=(self.gguf_path,))


def sentencepiece_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types (``gguf.TokenType`` values) of the tiny vocabulary."""
    tokens = [UNK, BOS, EOS]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces: dict[str, None] = {SPIECE_SPACE: None}
    for line in _CORPUS:
        for char in line.replace(" ", SPIECE_SPACE):
            pieces[char] = None
    for line in _CORPUS:
        for word in line.split():
            piece = SPIECE_SPACE + word
            for end in range(2, len(piece) + 1):
                pieces[piece[:end]] = None
    tokens += list(pieces)
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # SentencePiece BPE scores: the earlier a piece, the higher its merge priority.
    scores = [0.0] * (BYTE_OFFSET + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def build_tiny_sentencepiece(
    dest: Path,
    *,
    seed: int = 0,
    context_length: int = 4096,
    tensor_type: GGUFTensorType = "F32",
    eos_id: int | None = None,
    chat_template: str | None = LLAMA2_TEMPLATE,
    name: str = "tiny-spm.gguf",
) -> TinySentencePiece:
    """Write the tiny SentencePiece Llama as a GGUF file ``dest / name``.

    Args:
        dest: a directory (created if needed).
        seed: weights depend only on it.
        context_length: ``llama.context_length``.
        tensor_type: type of the 2-D tensors (norms are always F32).
        eos_id: ``tokenizer.ggml.eos_token_id`` (default: the id of ``</s>``); tests point it at
            a token the model generates to exercise stop tokens.
        chat_template: ``tokenizer.chat_template``; None writes none.
        name: the file name.
    """
    dest.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = sentencepiece_vocabulary()
    special = [tokens.index(t) for t in (UNK, BOS, EOS)]
    weights = _random_weights(len(tokens), special, seed, tie=False)
    eos = special[2] if eos_id is None else eos_id

    path = dest / name
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-spm")
    writer.add_context_length(context_length)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(special[0])
    writer.add_bos_token_id(special[1])
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for hf_name, array in weights.items():
        tensor_name = _gguf_name(hf_name)
        if tensor_name.endswith("attn_q.weight"):
            array = llama_permute(array, HEADS)
        elif tensor_name.endswith("attn_k.weight"):
            array = llama_permute(array, KV_HEADS)
        if array.ndim == 1 or tensor_type == "F32":
            writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float32))
        elif tensor_type == "F16":
            writer.add_tensor(tensor_name, array.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinySentencePiece(
        gguf_path=path,
        model_id="cortex-test/tiny-spm-GGUF",
        vocab_size=len(tokens),
        context_length=context_length,
        tokens=tuple(tokens),
        bos_id=special[1],
        eos_id=eos,
    )


#: ``GGML_FILE_MAGIC`` ("ggml" as a little-endian uint32).
GGML_MAGIC: Final = 0x67676D6C
GPT2_EOS: Final = "<|endoftext|>"


@dataclass(frozen=True)
class TinyGPT2:
    """Where the built legacy GGML file lies, and facts tests need."""

    path: Path
    model_id: str
    vocab: tuple[bytes, ...]
    context_length: int
    eos_id: int

    def files(self) -> ModelFiles:
        """`ModelFiles` for the file alone (its architecture then comes from its name)."""
        return ModelFiles(model_id=self.model_id, format="gguf", weights=(self.path,))


def build_tiny_gpt2_ggml(
    dest: Path, *, seed: int = 0, context_length: int = 128, name: str = "tiny-gpt2-ggml.bin"
) -> TinyGPT2:
    """Write a tiny random-weight GPT-2 (2 layers, hidden 64, all F32) as a legacy GGML file.

    The vocabulary is the 256 single bytes, every prefix of every `` word`` of the corpus (as
    bytes: legacy GPT-2 files store decoded token bytes) and ``<|endoftext|>`` last.
    """
    dest.mkdir(parents=True, exist_ok=True)
    vocab: dict[bytes, None] = {bytes([b]): None for b in range(256)}
    for line in _CORPUS:
        for word in line.split():
            piece = (" " + word).encode()
            for end in range(2, len(piece) + 1):
                vocab[piece[:end]] = None
    vocab[GPT2_EOS.encode()] = None
    tokens = list(vocab)
    n_vocab, n_embd, n_head, n_layer = len(tokens), HIDDEN, HEADS, LAYERS
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        scale = gain / float(np.sqrt(cols))
        return (scale * rng.standard_normal((rows, cols))).astype(np.float32)

    def vector(size: int, base: float = 0.0, scale: float = 0.1) -> np.ndarray:
        return (base + scale * rng.standard_normal(size)).astype(np.float32)

    # numpy shapes are (ne[1], ne[0]): ggml's first dimension varies fastest.
    tensors: dict[str, np.ndarray] = {
        "model/ln_f/g": vector(n_embd, 1.0),
        "model/ln_f/b": vector(n_embd),
        "model/wte": rng.standard_normal((n_vocab, n_embd)).astype(np.float32),
        "model/wpe": vector(context_length * n_embd).reshape(context_length, n_embd),
        "model/lm_head": rng.standard_normal((n_vocab, n_embd)).astype(np.float32),
    }
    for i in range(n_layer):
        p = f"model/h{i}/"
        tensors[p + "ln_1/g"] = vector(n_embd, 1.0)
        tensors[p + "ln_1/b"] = vector(n_embd)
        tensors[p + "ln_2/g"] = vector(n_embd, 1.0)
        tensors[p + "ln_2/b"] = vector(n_embd)
        tensors[p + "attn/c_attn/w"] = matrix(3 * n_embd, n_embd)
        tensors[p + "attn/c_attn/b"] = vector(3 * n_embd)
        tensors[p + "attn/c_proj/w"] = matrix(n_embd, n_embd, 2.0)
        tensors[p + "attn/c_proj/b"] = vector(n_embd)
        tensors[p + "mlp/c_fc/w"] = matrix(4 * n_embd, n_embd)
        tensors[p + "mlp/c_fc/b"] = vector(4 * n_embd)
        tensors[p + "mlp/c_proj/w"] = matrix(n_embd, 4 * n_embd, 2.0)
        tensors[p + "mlp/c_proj/b"] = vector(n_embd)

    path = dest / name
    with path.open("wb") as out:
        # magic, then n_vocab, n_ctx, n_embd, n_head, n_layer, ftype (0 = all F32)
        out.write(
            struct.pack("<I6i", GGML_MAGIC, n_vocab, context_length, n_embd, n_head, n_layer, 0)
        )
        out.write(struct.pack("<i", n_vocab))
        for token in tokens:
            out.write(struct.pack("<I", len(token)) + token)
        for tensor_name, array in tensors.items():
            encoded = tensor_name.encode()
            dims = list(reversed(array.shape))
            out.write(struct.pack(f"<3i{len(dims)}i", len(dims), len(encoded), 0, *dims))
            out.write(encoded)
            out.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return TinyGPT2(
        path=path,
        model_id="cortex-test/tiny-gpt2-ggml",
        vocab=tuple(tokens),
        context_length=context_length,
        eos_id=len(tokens) - 1,
    )
