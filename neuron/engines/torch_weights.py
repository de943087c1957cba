"""Config and weights for `DecoderModel`, from a safetensors folder or a GGUF file.

The model is built on the ``meta`` device (no memory), then each tensor is read, converted to
the target dtype and device, and put in place one at a time, so loading never holds more than the
model plus one tensor in flight. GGUF tensors are dequantised with ``gguf.quants``; llama.cpp's
converter stores llama-architecture Q and K rows permuted for ggml's RoPE, which is undone here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize
from safetensors import safe_open
from torch import nn

from neuron.engines.base import ProgressCallback
from neuron.engines.torch_decoder import (
    FUSED_PARTS,
    DecoderConfig,
    DecoderModel,
    RopeScaling,
    fused_part,
    rope_inverse_frequencies,
)
from neuron.errors import ModelLoadError, UnsupportedArchitectureError
from neuron.text.tokenizer import GGUFMetadata, gguf_value

logger = logging.getLogger(__name__)

#: config.json ``architectures`` / ``model_type`` → our family name.
HF_ARCHITECTURES: Final = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_HF_MODEL_TYPES: Final = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
#: GGUF ``general.architecture`` values we can run.
GGUF_ARCHITECTURES: Final = frozenset({"llama", "qwen2", "qwen3"})

# Largest float32 block dequantised at once (elements): bounds the load's transient memory.
_DEQUANT_BLOCK_ELEMENTS: Final = 1 << 22
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES: Final = ("rotary_emb.inv_freq",)

_GGUF_LAYER_NAMES: Final = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES: Final = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFTensor(Protocol):
    """The part of `gguf.ReaderTensor` used here."""

    @property
    def name(self) -> str:
        """Tensor name, e.g. ``blk.0.attn_q.weight``."""
        ...

    @property
    def tensor_type(self) -> GGMLQuantizationType:
        """A `gguf.GGMLQuantizationType`."""
        ...

    @property
    def data(self) -> np.ndarray:
        """Raw (possibly quantised) data, shaped in numpy (row-major) order."""
        ...


class GGUFFile(GGUFMetadata, Protocol):
    """The part of `gguf.GGUFReader` used here: metadata fields and tensors."""

    @property
    def tensors(self) -> Sequence[GGUFTensor]:
        """The file's tensors."""
        ...


# --------------------------------------------------------------------------- configs


def _int(config: Mapping[str, object], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"config.json: '{key}' must be an integer, got {value!r}")
    return value


def _float(config: Mapping[str, object], key: str, default: float) -> float:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelLoadError(f"config.json: '{key}' must be a number, got {value!r}")
    return float(value)


def hf_architecture(config: Mapping[str, object]) -> str:
    """Our family name for a transformers ``config.json``.

    Raises:
        UnsupportedArchitectureError: not a Llama / Mistral / Qwen2 / Qwen3 causal LM.
    """
    architectures = config.get("architectures")
    names: list[str] = []
    if isinstance(architectures, list):
        names = [a for a in architectures if isinstance(a, str)]
    for name in names:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    model_type = config.get("model_type")
    if not names and isinstance(model_type, str) and model_type in _HF_MODEL_TYPES:
        return _HF_MODEL_TYPES[model_type]
    raise UnsupportedArchitectureError(
        names[0] if names else str(model_type), "torch", "supported: " + ", ".join(HF_ARCHITECTURES)
    )


def _hf_rope_scaling(config: Mapping[str, object], architecture: str) -> RopeScaling | None:
    raw = config.get("rope_scaling")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"config.json: rope_scaling must be an object, got {raw!r}")
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=_float(raw, "factor", 1.0))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=_float(raw, "factor", 8.0),
            low_freq_factor=_float(raw, "low_freq_factor", 1.0),
            high_freq_factor=_float(raw, "high_freq_factor", 4.0),
            original_context_length=_int(raw, "original_max_position_embeddings", 8192),
        )
    raise UnsupportedArchitectureError(
        architecture, "torch", f"rope_scaling type {kind!r} is not implemented"
    )


def config_from_hf(config: Mapping[str, object]) -> DecoderConfig:
    """Build a `DecoderConfig` from a transformers ``config.json`` (already parsed).

    Raises:
        UnsupportedArchitectureError: an architecture or feature the decoder does not implement.
        ModelLoadError: a field is missing or has the wrong type.
    """
    arch = hf_architecture(config)
    if config.get("mlp_bias"):
        raise UnsupportedArchitectureError(arch, "torch", "mlp_bias is not implemented")
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", arch == "llama")
    if uses_window and isinstance(window, int) and window < _int(config, "max_position_embeddings"):
        raise UnsupportedArchitectureError(arch, "torch", "sliding-window attention")
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    rope_params = config.get("rope_parameters")  # transformers >= 4.56 moves rope_theta here
    rope_source = rope_params if isinstance(rope_params, Mapping) else config
    return DecoderConfig(
        architecture=arch,
        vocab_size=_int(config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size"),
        num_layers=_int(config, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_int(config, "num_key_value_heads", heads),
        head_dim=_int(config, "head_dim", hidden // heads),
        context_length=_int(config, "max_position_embeddings"),
        rms_norm_eps=_float(config, "rms_norm_eps", 1e-6),
        rope_theta=_float(rope_source, "rope_theta", 10000.0),
        rope_scaling=_hf_rope_scaling(
            {"rope_scaling": rope_params} if isinstance(rope_params, Mapping) else config, arch
        ),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
    )


def config_from_gguf(reader: GGUFMetadata, tensor_names: frozenset[str]) -> DecoderConfig:
    """Build a `DecoderConfig` from GGUF metadata (``<arch>.*`` keys).

    Args:
        reader: the GGUF reader.
        tensor_names: names of the file's tensors (to detect biases, q/k norms, tied output).

    Raises:
        UnsupportedArchitectureError: an architecture or feature the decoder does not implement.
        ModelLoadError: required metadata is missing.
    """
    arch = gguf_value(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            str(arch),
            "torch",
            "supported GGUF architectures: " + ", ".join(sorted(GGUF_ARCHITECTURES)),
        )

    def number(key: str, default: float | None = None) -> float:
        value = gguf_value(reader, f"{arch}.{key}")
        if value is None:
            value = default
        if isinstance(value, list):
            raise UnsupportedArchitectureError(arch, "torch", f"per-layer {key} is not supported")
        if not isinstance(value, int | float):
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return value

    if number("expert_count", 0):
        raise UnsupportedArchitectureError(arch, "torch", "mixture-of-experts models")
    hidden = int(number("embedding_length"))
    heads = int(number("attention.head_count"))
    head_dim = int(number("attention.key_length", hidden // heads))
    rotary_dims = int(number("rope.dimension_count", head_dim))
    if rotary_dims != head_dim:
        raise UnsupportedArchitectureError(arch, "torch", "partial rotary embeddings")
    scaling_type = gguf_value(reader, f"{arch}.rope.scaling.type")
    scaling: RopeScaling | None = None
    if scaling_type == "linear":
        scaling = RopeScaling(kind="linear", factor=number("rope.scaling.factor", 1.0))
    elif scaling_type not in (None, "none"):
        raise UnsupportedArchitectureError(
            arch, "torch", f"rope scaling type {scaling_type!r} is not implemented"
        )
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    default_vocab = len(tokens) if isinstance(tokens, list) else None
    return DecoderConfig(
        architecture=arch,
        vocab_size=int(number("vocab_size", default_vocab)),
        hidden_size=hidden,
        intermediate_size=int(number("feed_forward_length")),
        num_layers=int(number("block_count")),
        num_heads=heads,
        num_kv_heads=int(number("attention.head_count_kv", heads)),
        head_dim=head_dim,
        context_length=int(number("context_length")),
        rms_norm_eps=float(number("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(number("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
    )


# --------------------------------------------------------------------------- weights


class _Assembler:
    """Puts tensors into a meta-device `DecoderModel`, one at a time."""

    def __init__(self, config: DecoderConfig, *, device: torch.device, dtype: torch.dtype) -> None:
        with torch.device("meta"):
            self.model = DecoderModel(config)
        self.device = device
        self.dtype = dtype
        self._expected: set[str] = set()
        """Checkpoint tensor names: the model's parameters, fused ones by their parts."""
        for name, _ in self.model.named_parameters():
            module, _, attr = name.rpartition(".")
            head, _, rest = module.partition(".")
            layer, _, local = rest.partition(".")
            parts = FUSED_PARTS.get(local) if head == "layers" else None
            if parts is None:
                self._expected.add(name)
            else:
                self._expected.update(f"layers.{layer}.{part}.{attr}" for part in parts)
        self._loaded: set[str] = set()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._expected:
            raise ModelLoadError(f"unexpected tensor '{name}' for this architecture")
        fused = fused_part(self.model.config, name)
        target, start, end = fused if fused is not None else (name, 0, 0)
        module_name, _, attr = target.rpartition(".")
        module = self.model.get_submodule(module_name)
        current = getattr(module, attr)
        shape = tuple(current.shape)
        if fused is not None:
            shape = (end - start, *shape[1:])
        if shape != tuple(tensor.shape):
            raise ModelLoadError(
                f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {shape}"
            )
        value = tensor.to(device=self.device, dtype=self.dtype)
        if fused is not None:  # a slice of rows of the fused tensor, made on its first part
            if current.is_meta:
                current = nn.Parameter(torch.empty(current.shape, device=self.device,
                                                   dtype=self.dtype), requires_grad=False)
                setattr(module, attr, current)
            current.data[start:end] = value
        else:
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        self._loaded.add(name)

    def finish(self, freq_factors: torch.Tensor | None = None) -> DecoderModel:
        config = self.model.config
        if "lm_head.weight" not in self._loaded:
            if not config.tie_word_embeddings:
                logger.info("no lm_head weights: tying them to the embeddings")
            self.model.tie_weights()
            self._loaded.add("lm_head.weight")
        missing = sorted(self._expected - self._loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelLoadError(f"{len(missing)} weight tensors missing: {shown}")
        self.model.inv_freq = rope_inverse_frequencies(config, freq_factors).to(self.device)
        return self.model.eval()


def load_safetensors(
    config: DecoderConfig,
    shards: Sequence[Path],
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressCallback,
) -> DecoderModel:
    """Load transformers-named weights from safetensors shards.

    Raises:
        ModelLoadError: a shard is unreadable, a tensor is missing, unexpected or misshapen.
    """
    assembler = _Assembler(config, device=device, dtype=dtype)
    try:
        names_by_shard = []
        for shard in shards:
            with safe_open(str(shard), framework="pt") as handle:
                names_by_shard.append(list(handle.keys()))
        total = sum(len(names) for names in names_by_shard) or 1
        done = 0
        for shard, names in zip(shards, names_by_shard, strict=True):
            with safe_open(str(shard), framework="pt") as handle:
                for name in names:
                    done += 1
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    target = name.removeprefix("model.")
                    assembler.put(target, handle.get_tensor(name))
                    progress(done / total, f"{shard.name}: {name}")
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"cannot read safetensors weights: {exc}") from exc
    return assembler.finish()


def gguf_tensor_target(name: str) -> str | None:
    """Our parameter name for a GGUF tensor name (None for tensors handled elsewhere)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute(w, n_head, n_head_kv)`` on Q or K rows (or biases).

    The converter reorders each head's rows from rotate-half order into interleaved pairs:
    ``w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2).reshape(w.shape)``.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _dequantize(tensor: GGUFTensor, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Dequantise ``tensor`` block by block straight into a tensor of ``dtype`` on ``device``,
    so the float32 intermediate never exceeds `_DEQUANT_BLOCK_ELEMENTS`."""
    data = tensor.data
    rows = data.shape[0]
    row_elements = max(1, data.size // max(1, rows))
    step = max(1, _DEQUANT_BLOCK_ELEMENTS // row_elements)
    out: torch.Tensor | None = None
    for start in range(0, rows, step):
        block = np.asarray(dequantize(data[start : start + step], tensor.tensor_type), np.float32)
        if not block.flags.writeable:  # F32 tensors are views of the read-only memory map
            block = block.copy()
        if out is None:
            out = torch.empty((rows, *block.shape[1:]), dtype=dtype, device=device)
        out[start : start + block.shape[0]] = torch.from_numpy(block)
    if out is None:
        raise ModelLoadError(f"GGUF tensor '{tensor.name}' is empty")
    return out


def load_gguf(
    tensors: Sequence[GGUFTensor],
    config: DecoderConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressCallback,
) -> DecoderModel:
    """Load and dequantise the weights of a GGUF file, one tensor at a time.

    Args:
        tensors: the file's tensors (``GGUFReader.tensors``; they only need the file's memory
            map, so the reader and its parsed metadata can be dropped first).
        config: from `config_from_gguf`.
        device: target device.
        dtype: target dtype.
        progress: called per tensor.

    Raises:
        ModelLoadError: a tensor type cannot be dequantised, or tensors are missing or misshapen.
    """
    assembler = _Assembler(config, device=device, dtype=dtype)
    permute = config.architecture == "llama"
    freq_factors: torch.Tensor | None = None
    for index, tensor in enumerate(tensors, start=1):
        name = tensor.name
        if name == "rope_freqs.weight":
            freq_factors = _dequantize(tensor, device=torch.device("cpu"), dtype=torch.float32)
            continue
        target = gguf_tensor_target(name)
        if target is None:
            raise ModelLoadError(f"unexpected GGUF tensor '{name}' for this architecture")
        try:
            value = _dequantize(tensor, device=device, dtype=dtype)
        except NotImplementedError as exc:
            raise ModelLoadError(f"GGUF tensor '{name}': {exc}") from exc
        if permute and target.endswith(("q_proj.weight", "q_proj.bias")):
            value = unpermute_rope_rows(value, config.num_heads)
        elif permute and target.endswith(("k_proj.weight", "k_proj.bias")):
            value = unpermute_rope_rows(value, config.num_kv_heads)
        assembler.put(target, value)
        progress(index / len(tensors), name)
    return assembler.finish(freq_factors)
