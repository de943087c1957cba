"""A compact decoder-only transformer for the Llama / SmolLM / Qwen2 / Qwen3 families.

RMSNorm, rotary position embeddings (rotate-half form, as in transformers), grouped-query
attention through ``scaled_dot_product_attention(enable_gqa=True)``, a SwiGLU MLP and optionally
tied embeddings. Qwen2's q/k/v biases and Qwen3's per-head q/k norms are used when configured.

The forward pass works on a *batch of sequences*, each with its own `KVCache`: the new tokens of
all sequences are concatenated into one flat row of tokens, so every linear layer runs once for
the whole batch, and only attention is computed per sequence (each against its own cache, at its
own positions). A single sequence is a batch of one; continuous batching only has to build the
batch. Parameter names follow transformers' ``LlamaForCausalLM`` minus the ``model.`` prefix,
except the projections run as one matrix (``qkv_proj``, ``gate_up_proj``; `FUSED_PARTS` says
which checkpoint tensors fill them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from neuron.engines.torch_cpu_kernels import (
    CpuKernels,
    DecodeAttention,
    DecodePlan,
    LayerScratch,
    LayerWeights,
    NativeLayer,
    PanelledLinear,
    RmsNorm,
)
from neuron.engines.torch_threads import ThreadSplit
from neuron.errors import UnsupportedArchitectureError


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_scaling`` in config.json)."""

    kind: str
    """``linear`` or ``llama3``."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Shape and numerics of a decoder; built from config.json or GGUF metadata."""

    architecture: str
    """``llama``, ``qwen2`` or ``qwen3`` (informational; the flags below drive the maths)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """q/k/v projections carry biases (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedArchitectureError(
                self.architecture,
                "torch",
                f"{self.num_heads} attention heads are not a multiple of {self.num_kv_heads} "
                "key/value heads",
            )
        if self.head_dim % 2:
            raise UnsupportedArchitectureError(
                self.architecture, "torch", f"odd head dimension {self.head_dim}"
            )


#: Projections the decoder runs as one matrix (one matrix product instead of three or two),
#: and the checkpoint tensors stacked in it, in row order (per layer, under its ``layers.N.``).
FUSED_PARTS: Final = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fused_part(config: DecoderConfig, name: str) -> tuple[str, int, int] | None:
    """Where checkpoint tensor ``name`` (``layers.3.self_attn.k_proj.weight``) lives in the
    decoder: ``(fused tensor name, first row, end row)``; None for tensors that are not fused."""
    module, _, attr = name.rpartition(".")
    prefix, _, local = module.partition(".")
    layer, _, local = local.partition(".")
    if prefix != "layers" or not layer.isdigit():
        return None
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    rows = {"self_attn.q_proj": (0, q_rows), "self_attn.k_proj": (q_rows, q_rows + kv_rows),
            "self_attn.v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows),
            "mlp.gate_proj": (0, config.intermediate_size),
            "mlp.up_proj": (config.intermediate_size, 2 * config.intermediate_size)}
    for fused, parts in FUSED_PARTS.items():
        if local in parts:
            start, end = rows[local]
            return f"layers.{layer}.{fused}.{attr}", start, end
    return None


class KVCache:
    """Keys and values of one sequence, preallocated for ``capacity`` positions.

    ``k`` and ``v`` have shape ``[layers, kv_heads, capacity, head_dim]``; positions
    ``[0, length)`` are filled.
    """

    def __init__(
        self,
        config: DecoderConfig,
        capacity: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        """Allocate a cache for ``capacity`` positions (prompt plus generated tokens)."""
        if capacity < 1:
            raise ValueError("KV cache capacity must be positive")
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes the cache takes on its device."""
        return 2 * self.k.numel() * self.k.element_size()

    def grow(self, capacity: int) -> None:
        """Make room for ``capacity`` positions, keeping what is cached."""
        if capacity <= self.capacity:
            return
        layers, heads, _, dim = self.k.shape
        k = self.k.new_empty((layers, heads, capacity, dim))
        v = self.v.new_empty((layers, heads, capacity, dim))
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v, self.capacity = k, v, capacity


class StepViews:
    """What one forward pass's attention needs of the caches, made once per pass rather than
    once per layer and sequence (that bookkeeping was a sixth of a 16-sequence decode step on a
    CPU).

    With a CPU decode kernel (`neuron.engines.torch_cpu_kernels`), the sequences that bring
    one token are `native` (one kernel call per layer); the others, and every sequence without
    the kernel, go through torch: their indices are `torch_entries`, and for layer ``l``
    ``new_k[l]`` and ``new_v[l]`` list where their new keys and values go (``[kv_heads, count,
    head_dim]``), ``keys[l]`` and ``values[l]`` what they attend to, their cache up to and
    including the new tokens (``[1, kv_heads, end, head_dim]``).
    """

    def __init__(self, caches: Sequence[KVCache], counts: Sequence[int],
                 kernel: DecodeAttention | None, group: int, threads: int) -> None:
        self.starts = [cache.length for cache in caches]
        self.counts = list(counts)
        self.offsets = [0, *accumulate(counts)][:-1]
        self.native: DecodePlan | None = None
        decoding = [] if kernel is None else [i for i, n in enumerate(counts) if n == 1]
        if kernel is not None and decoding:
            self.native = kernel.plan([self.offsets[i] for i in decoding],
                                      [caches[i].k for i in decoding],
                                      [caches[i].v for i in decoding],
                                      [self.starts[i] for i in decoding], group, threads)
        self.torch_entries = [i for i, n in enumerate(counts) if self.native is None or n != 1]
        new_k, new_v, keys, values = [], [], [], []
        for i in self.torch_entries:
            cache, start, end = caches[i], self.starts[i], self.starts[i] + counts[i]
            new_k.append(cache.k[:, :, start:end].unbind(0))
            new_v.append(cache.v[:, :, start:end].unbind(0))
            keys.append(cache.k[:, :, :end].unsqueeze(1).unbind(0))
            values.append(cache.v[:, :, :end].unsqueeze(1).unbind(0))
        self.new_k = list(zip(*new_k, strict=True))
        self.new_v = list(zip(*new_v, strict=True))
        self.keys = list(zip(*keys, strict=True))
        self.values = list(zip(*values, strict=True))


class RowPlan:
    """The entries of the forward pass in progress: how many new rows each sequence brings.

    Layers that choose a kernel by size (`neuron.engines.torch_quant.Int8Linear`) choose per
    entry, never by the size of the whole batch, so a sequence's numbers do not depend on the
    sequences that share its step.
    """

    def __init__(self) -> None:
        self._counts: tuple[int, ...] = ()
        self._rows = 0
        self._segments: dict[int, list[tuple[int, int, bool]]] = {}

    def set(self, counts: Sequence[int]) -> None:
        """Describe the rows of the next layer calls: ``counts[i]`` rows for entry ``i``."""
        self._counts = tuple(counts)
        self._rows = sum(self._counts)
        self._segments = {}

    def segments_for(self, rows: int, large: int) -> list[tuple[int, int, bool]]:
        """``(start, end, is_large)`` runs of consecutive entries on the same side of ``large``
        rows; rows that are not the planned ones count as one entry."""
        if rows != self._rows:
            return [(0, rows, rows >= large)]
        cached = self._segments.get(large)
        if cached is not None:
            return cached
        segments: list[tuple[int, int, bool]] = []
        start = 0
        for count in self._counts:
            is_large = count >= large
            if segments and segments[-1][2] == is_large:
                segments[-1] = (segments[-1][0], start + count, is_large)
            else:
                segments.append((start, start + count, is_large))
            start += count
        self._segments[large] = segments
        return segments


class _Linear(nn.Linear):
    """`nn.Linear` without random initialisation: weights always come from a checkpoint."""

    def reset_parameters(self) -> None:
        """Skip initialisation (it is wasted work, and slow on the meta device)."""


class _Embedding(nn.Embedding):
    """`nn.Embedding` without random initialisation: weights always come from a checkpoint."""

    def reset_parameters(self) -> None:
        """Skip initialisation (it is wasted work, and slow on the meta device)."""


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like transformers' LlamaRMSNorm."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.kernel: RmsNorm | None = None
        """The CPU kernel, where the engine built one (float32 inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:
            if self.kernel is not None:
                return self.kernel(x, self.weight, self.eps)
            # torch's fused norm: one call, the same numbers as the formula below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and a per-sequence KV cache."""

    def __init__(self, config: DecoderConfig, layer_index: int, threads: ThreadSplit) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.threads = threads
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = _Linear(config.hidden_size, q_size + 2 * kv_size,
                                bias=config.attention_bias)
        """q, k and v projections as one matrix (rows in that order; see `FUSED_PARTS`)."""
        self.o_proj = _Linear(q_size, config.hidden_size, bias=False)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        views: StepViews,
    ) -> torch.Tensor:
        """Attend ``x`` (``[tokens, hidden]``, the sequences' new tokens back to back)."""
        heads = self.num_heads
        qk, v = self.split(self.threads.run(self.qkv_proj, x))
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        qk = _apply_rope(qk, cos, sin)  # q and k rotate alike: one pass over both
        return self.threads.run(self.o_proj, self.attend(qk, v, views))

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[tokens, (heads + 2 kv_heads) head_dim]`` as ``(qk, v)``: ``[tokens, heads +
        kv_heads, head_dim]`` and ``[tokens, kv_heads, head_dim]`` (views)."""
        heads = self.num_heads + self.num_kv_heads
        per_head = qkv.view(qkv.shape[0], heads + self.num_kv_heads, self.head_dim)
        return per_head[:, :heads], per_head[:, heads:]

    def attend(self, qk: torch.Tensor, v: torch.Tensor, views: StepViews) -> torch.Tensor:
        """Attention of the rotated queries and keys ``qk`` and values ``v`` (`split`'s
        shapes); appends the keys and values to the caches. ``[tokens, heads * head_dim]``,
        contiguous."""
        n = qk.shape[0]
        heads = self.num_heads
        layer = self.layer_index
        outputs: list[torch.Tensor] = []
        entries = views.torch_entries
        if entries:  # through torch's attention, sequence by sequence
            counts = views.counts
            # heads first ([heads, tokens, head_dim]): each sequence's rows are then a slice.
            # (The leading batch dimension of one keeps torch's CPU flash attention: for three
            # dimensions it falls back to the slower reference maths.)
            q = qk[:, :heads].transpose(0, 1).unsqueeze(0)
            k_parts = qk[:, heads:].transpose(0, 1).split_with_sizes(counts, dim=1)
            v_parts = v.transpose(0, 1).split_with_sizes(counts, dim=1)
            q_parts = q.split_with_sizes(counts, dim=2)
            torch._foreach_copy_(list(views.new_k[layer]), [k_parts[i] for i in entries])
            torch._foreach_copy_(list(views.new_v[layer]), [v_parts[i] for i in entries])
            outputs = [_attend(q_parts[i], keys, values, views.starts[i], counts[i])
                       for i, keys, values in zip(entries, views.keys[layer],
                                                  views.values[layer], strict=True)]
        if views.native is None:
            attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            heads_last = attended[0].transpose(0, 1).reshape(n, -1)
        else:
            out = qk.new_empty((n, heads, self.head_dim))
            views.native.run(layer, qk, v, out)
            for i, part in zip(entries, outputs, strict=True):
                out[views.offsets[i] : views.offsets[i] + views.counts[i]] = part[0].transpose(0, 1)
            heads_last = out.view(n, -1)
        return heads_last.contiguous()


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
            count: int) -> torch.Tensor:
    """torch's attention for one sequence's ``count`` new tokens, the first at ``start``."""
    if count == 1:  # one new token attends to everything cached
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    if start == 0:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
    # a later prefill chunk: causal, offset by what the cache already holds
    end = start + count
    positions = torch.arange(start, end, device=q.device).unsqueeze(1)
    mask = torch.arange(end, device=q.device).unsqueeze(0) <= positions
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: DecoderConfig, threads: ThreadSplit) -> None:
        super().__init__()
        self.threads = threads
        self.gate_up_proj = _Linear(config.hidden_size, 2 * config.intermediate_size,
                                    bias=False)
        """gate and up projections as one matrix (rows in that order; see `FUSED_PARTS`)."""
        self.down_proj = _Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.threads.run(self.gate_up_proj, x).chunk(2, dim=-1)
        return self.threads.run(self.down_proj, F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: DecoderConfig, layer_index: int, threads: ThreadSplit) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index, threads)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, threads)
        self.native: NativeLayer | None = None
        """Everything but attention in the CPU kernels, where the engine set them up
        (`DecoderModel.use_cpu_kernels`)."""

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        views: StepViews,
        scratch: LayerScratch | None = None,
    ) -> torch.Tensor:
        """The block on ``x`` (``[tokens, hidden]``); with `native` and a ``scratch``, in place."""
        if self.native is not None and scratch is not None:
            qk, v = self.self_attn.split(self.native.attention_in(x, scratch))
            self.native.attention_out(x, self.self_attn.attend(qk, v, views), scratch)
            return x
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, views)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out

    def native_weights(self) -> LayerWeights | None:
        """The layer as `NativeLayer` reads it; None where a linear layer does not keep
        float16 panels (other weight kinds, or no CPU kernels) or a bias the kernels lack."""
        attention, mlp = self.self_attn, self.mlp
        parts = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
        panels = [part.panels if isinstance(part, PanelledLinear) else None for part in parts]
        qkv, o, gate_up, down = panels
        if qkv is None or o is None or gate_up is None or down is None:
            return None
        if any(isinstance(part, PanelledLinear) and part.bias_values is not None
               for part in parts[1:]):
            return None
        qkv_proj = parts[0]
        assert isinstance(qkv_proj, PanelledLinear)
        return LayerWeights(
            heads=attention.num_heads, kv_heads=attention.num_kv_heads,
            head_dim=attention.head_dim, eps=self.input_layernorm.eps,
            input_norm=self.input_layernorm.weight.detach(),
            post_norm=self.post_attention_layernorm.weight.detach(),
            q_norm=None if attention.q_norm is None else attention.q_norm.weight.detach(),
            k_norm=None if attention.k_norm is None else attention.k_norm.weight.detach(),
            qkv_bias=qkv_proj.bias_values, qkv=qkv, o=o, gate_up=gate_up, down=down)


class DecoderModel(nn.Module):
    """The whole decoder: embeddings, blocks, final norm and LM head.

    Linear and embedding weights start uninitialised: build it on the ``meta`` device and fill
    it from a checkpoint (`torch_weights`).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.threads = ThreadSplit()
        """CPU threads of the linear layers' matrix products and of the rest (set by the
        engine; `neuron.engines.torch_threads`)."""
        self.embed_tokens = _Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.threads)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = _Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.row_plan = RowPlan()
        self.decode_attention: DecodeAttention | None = None
        """The CPU decode kernel, where the engine built one (float32 CPU caches only)."""

    def use_cpu_kernels(self, kernels: CpuKernels) -> None:
        """Run decode attention and the float32 norms in the CPU kernels, and, where every
        layer keeps float16 panels (after `neuron.engines.torch_quant.quantize` with the
        kernels' `PanelProduct`), the rest of each layer too (`NativeLayer`)."""
        self.decode_attention = kernels.decode_attention
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.kernel = kernels.rms_norm
        weights = [layer.native_weights() for layer in self._decoder_layers()]
        natives = [None if w is None else kernels.native_layer(w, self.threads.matmul)
                   for w in weights]
        if all(native is not None for native in natives):  # all or none: one path per pass
            for layer, native in zip(self._decoder_layers(), natives, strict=True):
                layer.native = native

    def _decoder_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, DecoderLayer)]

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head (``tie_word_embeddings``)."""
        self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, capacity: int) -> KVCache:
        """A KV cache for one sequence of up to ``capacity`` positions, on the model's device."""
        weight = self.embed_tokens.weight
        return KVCache(self.config, capacity, device=weight.device, dtype=weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        caches: Sequence[KVCache],
        counts: Sequence[int],
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run the new tokens of a batch of sequences and append them to their caches.

        Args:
            input_ids: ``[tokens]`` (int64): each sequence's new tokens, back to back.
            caches: one cache per sequence; each must have room for its new tokens.
            counts: how many of ``input_ids`` belong to each sequence (each >= 1).
            all_logits: return logits for every token instead of each sequence's last one.

        Returns:
            float32 logits, ``[sequences, vocab]`` (or ``[tokens, vocab]`` with ``all_logits``).
        """
        if len(caches) != len(counts) or sum(counts) != input_ids.shape[0]:
            raise ValueError("caches, counts and input_ids disagree")
        for cache, count in zip(caches, counts, strict=True):
            if count < 1 or cache.length + count > cache.capacity:
                raise ValueError(
                    f"{count} new tokens do not fit a cache at {cache.length}/{cache.capacity}"
                )
        positions = torch.cat(
            [
                torch.arange(c.length, c.length + n, device=input_ids.device)
                for c, n in zip(caches, counts, strict=True)
            ]
        )
        self.row_plan.set(counts)
        x = self.embed_tokens(input_ids)
        cos, sin = self._rope_tables(positions, x.dtype)
        views = StepViews(caches, counts, self.decode_attention,
                          self.config.num_heads // self.config.num_kv_heads, self.threads.matmul)
        layers = self._decoder_layers()
        native = layers[0].native if layers else None
        scratch = None if native is None else native.scratch(x.shape[0], cos, sin)
        for layer in layers:
            x = layer(x, cos, sin, views, scratch)
        for cache, count in zip(caches, counts, strict=True):
            cache.length += count
        if not all_logits:
            last = torch.tensor(list(accumulate(counts)), device=x.device) - 1
            x = x[last]
            self.row_plan.set([1] * len(counts))
        return self.threads.run(self.lm_head, self.norm(x)).float()

    def _rope_tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        assert isinstance(inv_freq, torch.Tensor)
        freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)
        # [tokens, 1, head_dim]; the sine's first half negated, for `_apply_rope`
        cos = torch.cat((freqs, freqs), dim=-1).unsqueeze(1).cos()
        sin = freqs.sin().unsqueeze(1)
        return cos.to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``[tokens, heads, head_dim]``: ``x cos + (-x2, x1) sin``, with the
    sign in the table (``(-sin, sin)``) and the halves swapped by one roll, the same numbers in
    four operations instead of seven."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def rope_inverse_frequencies(
    config: DecoderConfig, freq_factors: torch.Tensor | None = None
) -> torch.Tensor:
    """RoPE inverse frequencies (float32, ``[head_dim / 2]``), with the configured scaling.

    Args:
        config: the decoder's configuration.
        freq_factors: per-frequency divisors (GGUF ``rope_freqs.weight``, llama3-style scaling
            baked in by llama.cpp's converter); replaces ``config.rope_scaling``.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    )
    if freq_factors is not None:
        return (inv_freq / freq_factors.to("cpu", torch.float64)).float()
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).float()
    if scaling.kind == "llama3":
        low_wavelen = scaling.original_context_length / scaling.low_freq_factor
        high_wavelen = scaling.original_context_length / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_context_length / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float()
    raise UnsupportedArchitectureError(
        config.architecture, "torch", f"rope_scaling type {scaling.kind!r} is not implemented"
    )
