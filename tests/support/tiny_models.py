"""Tiny random-weight Llama models for tests, built on the fly (well under a second).

`build_tiny_llama` trains a byte-level BPE on a few sentences, draws seeded random weights for a
2-layer, 64-wide Llama (grouped-query attention, optionally tied embeddings) and writes the same
model twice:

* a transformers-style safetensors folder (``config.json``, ``tokenizer.json``,
  ``tokenizer_config.json`` with a ChatML template, ``generation_config.json``,
  ``model.safetensors``);
* a GGUF file written like llama.cpp's converter would (Q/K rows permuted for ggml's RoPE, full
  tokenizer metadata: tokens, token types, merges, ``pre = gpt-2``, bos/eos ids, chat template).

Only numpy, tokenizers, safetensors and gguf are used: building does not import torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from neuron.engines.base import ModelFiles

SPECIAL_TOKENS: Final = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Added, non-special tokens (GGUF token type USER_DEFINED).
ADDED_TOKENS: Final = ("<think>", "</think>")
#: Size the BPE trainer aims for (specials + 256 byte symbols + merges), before ADDED_TOKENS.
TRAINED_VOCAB_SIZE: Final = 483

HIDDEN: Final = 64
INTERMEDIATE: Final = 128
LAYERS: Final = 2
HEADS: Final = 4
KV_HEADS: Final = 2
HEAD_DIM: Final = HIDDEN // HEADS
ROPE_THETA: Final = 10000.0
RMS_EPS: Final = 1e-5

#: ChatML with a default system prompt, like SmolLM2's template.
CHATML_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS: Final = (
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello, world! How are you today? I am fine, thank you very much.",
    "A quick brown fox jumps over the lazy dog while the cat sleeps.",
    "def main():\n    return 42\n\nif __name__ == '__main__':\n    main()\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2024-06-01",
    "Ünïcödé text: café, naïve, façade, Straße, 日本語のテキスト, emoji 🙂🚀🎉.",
    "The neuron loads models and streams tokens back over the bus to the gateway.",
    "Questions and answers: what is the weather like? It is sunny and warm.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
    "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n",
    "Large language models predict the next token from the previous tokens.",
    "Some punctuation: (brackets), [squares], {braces}, quotes \"like this\", and 'that'.",
)

GGUFTensorType = Literal["F32", "F16", "Q8_0"]


@dataclass(frozen=True)
class TinyModel:
    """Where a built tiny model lies, and facts tests need."""

    folder: Path
    """The safetensors folder."""
    gguf_path: Path
    model_id: str
    vocab_size: int
    context_length: int

    def safetensors_files(self, **overrides: Path | None) -> ModelFiles:
        """`ModelFiles` for the safetensors folder; keyword overrides replace optional files."""
        files: dict[str, Path | None] = {
            "config": self.folder / "config.json",
            "tokenizer": self.folder / "tokenizer.json",
            "tokenizer_config": self.folder / "tokenizer_config.json",
            "chat_template": None,
            "generation_config": self.folder / "generation_config.json",
        }
        files.update(overrides)
        return ModelFiles(
            model_id=self.model_id,
            format="safetensors",
            weights=(self.folder / "model.safetensors",),
            **files,
        )

    def gguf_files(self, **overrides: Path | None) -> ModelFiles:
        """`ModelFiles` for the GGUF file alone (tokenizer and template from its metadata)."""
        files: dict[str, Path | None] = {
            "config": None,
            "tokenizer": None,
            "tokenizer_config": None,
            "chat_template": None,
            "generation_config": None,
        }
        files.update(overrides)
        return ModelFiles(
            model_id=self.model_id + "-GGUF", format="gguf", weights=(self.gguf_path,), **files
        )


def train_tokenizer() -> Tokenizer:
    """The tiny byte-level BPE (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tokenizer


def llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` for Q (``n_head``) or K (``n_head_kv``) rows."""
    rows = weight.shape[0]
    permuted: np.ndarray = (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )
    return permuted


def _random_weights(
    vocab: int, special_ids: list[int], seed: int, *, tie: bool
) -> dict[str, np.ndarray]:
    """transformers-named float32 weights.

    Attention and MLP outputs are scaled up so they dominate the residual stream (otherwise a
    random model mostly repeats its input token), and an untied head then gives varied greedy
    output with clear margins. Special tokens get zero rows: the model rarely emits them itself.
    """
    rng = np.random.default_rng(seed)

    def linear(out_features: int, in_features: int, gain: float = 1.0) -> np.ndarray:
        scale = gain / float(np.sqrt(in_features))
        return (scale * rng.standard_normal((out_features, in_features))).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    embed = rng.standard_normal((vocab, HIDDEN)).astype(np.float32)
    embed[special_ids] = 0.0
    weights = {"model.embed_tokens.weight": embed}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm(HIDDEN)
        weights[p + "self_attn.q_proj.weight"] = linear(HEADS * HEAD_DIM, HIDDEN)
        weights[p + "self_attn.k_proj.weight"] = linear(KV_HEADS * HEAD_DIM, HIDDEN)
        weights[p + "self_attn.v_proj.weight"] = linear(KV_HEADS * HEAD_DIM, HIDDEN)
        weights[p + "self_attn.o_proj.weight"] = linear(HIDDEN, HEADS * HEAD_DIM, 2.0)
        weights[p + "post_attention_layernorm.weight"] = norm(HIDDEN)
        weights[p + "mlp.gate_proj.weight"] = linear(INTERMEDIATE, HIDDEN)
        weights[p + "mlp.up_proj.weight"] = linear(INTERMEDIATE, HIDDEN)
        weights[p + "mlp.down_proj.weight"] = linear(HIDDEN, INTERMEDIATE, 2.0)
    weights["model.norm.weight"] = norm(HIDDEN)
    if not tie:
        head = rng.standard_normal((vocab, HIDDEN)).astype(np.float32)
        head[special_ids] = 0.0
        weights["lm_head.weight"] = head
    return weights


_GGUF_NAMES: Final = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = hf_name.split(".", 3)
    return f"blk.{index}.{_GGUF_NAMES[rest]}"


def _write_gguf(
    path: Path,
    tokenizer: Tokenizer,
    weights: dict[str, np.ndarray],
    *,
    context_length: int,
    tensor_type: GGUFTensorType,
) -> None:
    tokenizer_json = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in tokenizer_json["added_tokens"]:
        types[added["id"]] = (
            gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        )
    merges = [" ".join(pair) for pair in tokenizer_json["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
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
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for hf_name, array in weights.items():
        name = _gguf_name(hf_name)
        if name.endswith("attn_q.weight"):
            array = llama_permute(array, HEADS)
        elif name.endswith("attn_k.weight"):
            array = llama_permute(array, KV_HEADS)
        if array.ndim == 1 or tensor_type == "F32":
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif tensor_type == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_tiny_llama(
    dest: Path,
    *,
    seed: int = 0,
    tie_embeddings: bool = False,
    context_length: int = 256,
    gguf_tensor_type: GGUFTensorType = "F32",
) -> TinyModel:
    """Write a tiny Llama as a safetensors folder and as a GGUF file under ``dest``.

    Args:
        dest: a directory (created if needed); gets ``tiny-llama/`` and ``tiny-llama.gguf``.
        seed: weights depend only on it (the tokenizer is always the same).
        tie_embeddings: share the embedding matrix with the LM head.
        context_length: ``max_position_embeddings`` / ``llama.context_length``.
        gguf_tensor_type: type of the GGUF's 2-D tensors (norms are always F32).

    Returns:
        Where the files are.
    """
    folder = dest / "tiny-llama"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    special_ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    ids = dict(zip(SPECIAL_TOKENS, special_ids, strict=True))
    weights = _random_weights(
        vocab_size, [i for i in special_ids if i is not None], seed, tie=tie_embeddings
    )
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": context_length,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
        "torch_dtype": "float32",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": {"content": "<|endoftext|>", "special": True},
        "model_max_length": context_length,
        "chat_template": CHATML_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
    }
    for name, value in (
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
    ):
        (folder / name).write_text(json.dumps(value, indent=2), encoding="utf-8")
    gguf_path = dest / "tiny-llama.gguf"
    _write_gguf(
        gguf_path,
        tokenizer,
        weights,
        context_length=context_length,
        tensor_type=gguf_tensor_type,
    )
    return TinyModel(
        folder=folder,
        gguf_path=gguf_path,
        model_id="cortex-test/tiny-llama",
        vocab_size=vocab_size,
        context_length=context_length,
    )
