"""Compact weights for CPUs without fast 16-bit matrix units: every linear layer keeps its
weights as float16 (`Fp16Linear`, the default where torch has fbgemm, x86), int8 (per-row scale;
`Int8Linear`) or int4 (a scale and an offset per 32 weights, a GGUF Q4 block; `Int4Linear`);
activations, attention and the KV cache stay float32.

`Fp16Linear` runs fbgemm's float16-weight matrix product (the weights are widened to float32
inside the kernel, with AVX2's F16C): on SmolLM2-135M, one AMD EPYC core, a decode step's linear
layers take 20.8 ms at one row and 60 ms at 16 rows, against 26.8 and 134 ms for torch's int8
kernel, and float16 keeps the GGUF Q4 weights more exactly than int8 does. It gets every row of
a step in one call: its sums do not depend on the rows around a row, given a count of rows
that `fp16_rows` accepts (others are padded). Where the engine built its CPU kernels
(`neuron.engines.torch_cpu_kernels`), `Fp16Linear` runs their float16 product instead, with
fbgemm's sums for every count of rows and nothing padded. With those kernels, float32 weights
(``quantize = "none"``) are kept as their panels too (`Fp32Linear`, `float32_panels`): MKL's
float32 product gives a row different last bits alone and among others.

For int8 and int4, each forward pass picks a kernel per *entry* (a sequence's new tokens,
`RowPlan`), never per batch, so a sequence's numbers do not depend on who shares its step:

- entries of fewer than `DENSE_MIN_ROWS` rows (every decode step, short prompts) use torch's
  weight-only kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``; bfloat16
  inputs): they stream a quarter (an eighth) of float32's bytes, and memory bandwidth is what
  bounds a decode step;
- longer prompt pieces dequantise the weight to float32 and use the float32 matrix product, which
  is compute-bound there. Consecutive such entries share one dequantisation: fifteen 14-token
  prompt tails prefill in 0.94 s instead of 1.76 s with the int8 kernel (SmolLM2-135M, one
  core), while a lone 14-token piece costs 0.20 s instead of 0.14 s.

On AVX2-only CPUs torch's bfloat16 kernels take a slow path (about 8 GFLOP/s per core for matrix
products, and attention 3.5x slower than float32, measured), so nothing but the int8 kernel's
input is bfloat16 (and its output is rounded to bfloat16). The activations are never quantised,
so a row's result does not depend on the other rows of the batch: a sequence's greedy output is
the same alone or batched.
"""

from __future__ import annotations

from typing import Final, Literal, assert_never

import torch
import torch.nn.functional as F
from torch import nn

from neuron.devices import cpu_flags
from neuron.engines.torch_cpu_kernels import PanelProduct
from neuron.engines.torch_decoder import DecoderModel, RowPlan

#: A prompt piece of at least this many rows is multiplied in float32 (dequantised weights).
DENSE_MIN_ROWS: Final = 8


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


class _QuantLinear(nn.Module):
    """``y = x W^T + b`` with a quantised ``W``: a weight-only kernel for small entries, the
    weight dequantised to float32 for prompt pieces of `DENSE_MIN_ROWS` rows or more."""

    def __init__(self, linear: nn.Linear, plan: RowPlan) -> None:
        super().__init__()
        self.bias: torch.Tensor | None = (
            None if linear.bias is None else linear.bias.detach().float())
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        parts = [F.linear(flat[start:end].float(), self.dequantized()) if dense
                 else self.small(flat[start:end].to(torch.bfloat16).contiguous()).float()
                 for start, end, dense in self._plan.segments_for(flat.shape[0], DENSE_MIN_ROWS)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """Whether the kernel takes a layer of this shape. It reads the input in blocks: other
        widths read past the row (seen: a crash for a width of 172 with more than four rows)."""
        return linear.in_features % 32 == 0

    def small(self, rows: torch.Tensor) -> torch.Tensor:
        """The weight-only kernel on bfloat16 ``rows``."""
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The float32 weight, ``[out, in]``."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8Linear(_QuantLinear):
    """Int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear, plan: RowPlan) -> None:
        super().__init__(linear, plan)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight_int8",
                             torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("scale_column", scale.to(torch.bfloat16).float().unsqueeze(1))

    def small(self, rows: torch.Tensor) -> torch.Tensor:
        weight, scale = self.weight_int8, self.scale
        assert isinstance(weight, torch.Tensor)
        assert isinstance(scale, torch.Tensor)
        return torch._weight_int8pack_mm(rows, weight, scale)

    def dequantized(self) -> torch.Tensor:
        weight, column = self.weight_int8, self.scale_column
        assert isinstance(weight, torch.Tensor)
        assert isinstance(column, torch.Tensor)
        return weight.float() * column


#: Weights per int4 scale and offset: a GGUF Q4_0 / Q4_1 block, so those files lose nothing more.
INT4_GROUP: Final = 32


class Int4Linear(_QuantLinear):
    """4-bit weights in groups of `INT4_GROUP` along each row, each group with a scale and an
    offset (``w = (q - 8) * scale + zero``, the layout of torch's int4 kernel). Half the bytes of
    int8 per decode step; the nibbles are kept a second time, packed two per byte, for the
    float32 path (torch has no unpacking operator for its kernel's layout)."""

    def __init__(self, linear: nn.Linear, plan: RowPlan) -> None:
        super().__init__(linear, plan)
        out_features, in_features = linear.weight.shape
        groups = linear.weight.detach().float().view(out_features, in_features // INT4_GROUP,
                                                     INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        zero = low + 8 * scale
        # the kernel reads scale and offset in bfloat16: quantise against those values
        scale16, zero16 = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
        scale32, low32 = scale16.float(), zero16.float() - 8 * scale16.float()
        q = torch.round((groups - low32.unsqueeze(-1)) / scale32.unsqueeze(-1)).clamp(0, 15)
        q = q.view(out_features, in_features).to(torch.uint8)
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32), 1))
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale16.t(), zero16.t()], dim=-1).contiguous())
        self.register_buffer("nibbles", (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous())

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """The int4 kernel also packs output rows by 16."""
        return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0

    def small(self, rows: torch.Tensor) -> torch.Tensor:
        weight, scales = self.weight_int4, self.scales_and_zeros
        assert isinstance(weight, torch.Tensor)
        assert isinstance(scales, torch.Tensor)
        return torch._weight_int4pack_mm_for_cpu(rows, weight, INT4_GROUP, scales)

    def dequantized(self) -> torch.Tensor:
        nibbles, scales = self.nibbles, self.scales_and_zeros
        assert isinstance(nibbles, torch.Tensor)
        assert isinstance(scales, torch.Tensor)
        q = torch.stack([nibbles & 15, nibbles >> 4], dim=-1)
        q = q.view(self.out_features, -1, INT4_GROUP)
        scale, zero = scales.float().transpose(0, 1).unsqueeze(-2).unbind(-1)  # [out, groups, 1]
        return ((q.float() - 8) * scale + zero).view(self.out_features, self.in_features)


def fp16_rows(rows: int) -> int:
    """How many rows `Fp16Linear` hands fbgemm for ``rows``: the fewest from ``rows`` up that
    put no row in a block of one or two.

    fbgemm cuts a call's rows into blocks of 120, then each rest into blocks of one to six, each
    size with its own kernel, and the one- and two-row kernels' sums differ from the others' in
    the last bits. With 1, 2, 7, 14, 31, 32, 37, 38... rows (past 30, every count that leaves
    one or two over a multiple of six; then again for the rest past 120) a row lands in such a
    block, so a sequence's numbers would depend on how many rows share its step. Those counts
    get one or two zero rows more. The rule is checked against the kernel in the tests.
    """
    padded = rows
    while _lone_row_block(padded):
        padded += 1
    return padded


def _lone_row_block(rows: int) -> bool:
    rest = rows % 120
    return rest in (1, 2, 7, 14) or (rest >= 31 and rest % 6 in (1, 2))


def fbgemm_fp16_available() -> bool:
    """Whether this torch build has fbgemm's float16-weight linear (x86 builds)."""
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_prepack_fp16"))


class Fp16Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` in float16; ``x`` and ``y`` float32.

    With ``product`` (`neuron.engines.torch_cpu_kernels`), the weights are kept as its panels
    and every call runs it: the sums of fbgemm's three-to-six-row kernels for any number of rows,
    so nothing is padded, and a lone decode row reads the weights once instead of as three
    rows. Without it, fbgemm's packed weights and kernels, calls padded per `fp16_rows`."""

    def __init__(self, linear: nn.Linear, product: PanelProduct | None = None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._bias = None if linear.bias is None else linear.bias.detach().float()
        packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(),
                                                         self._bias)
        self._product = product
        self._packed = None if product is not None else packed
        self._panels: torch.Tensor | None = None
        weight_bytes = 2 * self.in_features * self.out_features
        if product is not None:  # fbgemm's float16 values: both paths multiply the same weights
            self._panels = product.panels(torch.ops.quantized.linear_unpack_fp16(packed)[0])
            weight_bytes = self._panels.numel() * self._panels.element_size()
        self._nbytes = weight_bytes + (0 if self._bias is None else 4 * self.out_features)
        self._zeros = torch.zeros(0 if product is not None else 2, self.in_features)
        """Padding rows (fbgemm)."""

    @property
    def uses_panels(self) -> bool:
        """Whether calls run the `PanelProduct` kernel rather than fbgemm."""
        return self._panels is not None

    @property
    def panels(self) -> torch.Tensor | None:
        """The weights as the `PanelProduct` kernel's panels; None on fbgemm."""
        return self._panels

    @property
    def bias_values(self) -> torch.Tensor | None:
        """The float32 bias, if any."""
        return self._bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if self._product is not None and self._panels is not None:
            out = self._product.linear(flat, self._panels, self.out_features, self._bias)
        else:
            out = self._fbgemm(flat)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _fbgemm(self, flat: torch.Tensor) -> torch.Tensor:
        rows = flat.shape[0]
        padding = fp16_rows(rows) - rows
        if padding:
            flat = torch.cat((flat, self._zeros[:padding]))
        out: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(flat.contiguous(),
                                                                     self._packed)
        return out[:rows] if padding else out

    def nbytes(self) -> int:
        return self._nbytes


class Fp32Linear(nn.Module):
    """``y = x W^T + b`` with float32 ``W`` kept as `PanelProduct` panels: every row the same
    sums in any batch (MKL's float32 product gives a row different last bits alone and among
    others), so a sequence's output is the same alone or batched with float32 weights too."""

    def __init__(self, linear: nn.Linear, product: PanelProduct) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._bias = None if linear.bias is None else linear.bias.detach().float()
        self._product = product
        self._panels = product.panels(linear.weight.detach(), torch.float32)

    @property
    def panels(self) -> torch.Tensor:
        """The weights as the `PanelProduct` kernel's panels."""
        return self._panels

    @property
    def bias_values(self) -> torch.Tensor | None:
        """The float32 bias, if any."""
        return self._bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        out = self._product.linear(flat, self._panels, self.out_features, self._bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self._panels.numel() * 4 + (0 if self._bias is None else 4 * self.out_features)


WeightKind = Literal["fp16", "int8", "int4"]


def quantize(model: DecoderModel, kind: WeightKind, product: PanelProduct | None = None) -> int:
    """Replace ``model``'s linear layers with `Fp16Linear` (running ``product`` where given),
    `Int8Linear` or `Int4Linear` in place (layers of shapes the int kernels do not take stay
    float32); returns the bytes the model's weights take afterwards."""
    model.float()
    for parent, name, child in _linear_layers(model):
        match kind:
            case "fp16":
                setattr(parent, name, Fp16Linear(child, product))
            case "int8" | "int4":
                packed = Int8Linear if kind == "int8" else Int4Linear
                if packed.fits(child):
                    setattr(parent, name, packed(child, model.row_plan))
            case _:
                assert_never(kind)
    return _weight_bytes(model)


def float32_panels(model: DecoderModel, product: PanelProduct) -> int:
    """Keep ``model``'s float32 linear layers as `Fp32Linear` (``product``'s panels) in place;
    returns the bytes the model's weights take afterwards.

    An LM head tied to the embeddings stays as it is: panels would be a second copy of the
    largest matrix (a gigabyte for a 1B model's vocabulary in float32), for a difference in
    the logits' last bits between a row alone and in a batch."""
    shared = {id(p) for p in model.embed_tokens.parameters()}
    for parent, name, child in _linear_layers(model):
        if (child.weight.dtype == torch.float32 and not child.weight.is_cuda
                and id(child.weight) not in shared):
            setattr(parent, name, Fp32Linear(child, product))
    return _weight_bytes(model)


def _linear_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in list(model.modules())
            for name, child in list(parent.named_children()) if isinstance(child, nn.Linear)]


def _weight_bytes(model: nn.Module) -> int:
    params = {id(p): p for p in model.parameters()}.values()
    size = sum(p.numel() * p.element_size() for p in params)
    return size + sum(m.nbytes() for m in model.modules()
                      if isinstance(m, _QuantLinear | Fp16Linear | Fp32Linear))
