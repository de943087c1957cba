"""Int8 weights for CPUs without fast 16-bit matrix units: every linear layer keeps its weights
as per-output-channel int8 with a per-row scale; activations, attention and the KV cache stay
float32.

Each forward pass picks a kernel per *entry* (a sequence's new tokens, `RowPlan`), never per
batch, so a sequence's numbers do not depend on who shares its step:

- entries of fewer than `DENSE_MIN_ROWS` rows (every decode step, short prompts) use torch's
  weight-only int8 kernel (``_weight_int8pack_mm``, bfloat16 inputs): it streams a quarter of
  float32's bytes, and memory bandwidth is what bounds a decode step;
- longer prompt pieces dequantise the weight to float32 and use the float32 matrix product, which
  is compute-bound there and about 1.5x faster than the int8 kernel at 48+ rows.

On AVX2-only CPUs torch's bfloat16 kernels take a slow path (about 8 GFLOP/s per core for matrix
products, and attention 3.5x slower than float32, measured), so nothing but the int8 kernel's
input is bfloat16. The activations are never quantised, so a row's result does not depend on the
other rows of the batch: a sequence's greedy output is the same alone or batched.
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from neuron.engines.torch_decoder import DecoderModel, RowPlan

#: A prompt piece of at least this many rows is multiplied in float32 (dequantised weights).
DENSE_MIN_ROWS: Final = 32


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` as int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear, plan: RowPlan) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight_int8",
                             torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("scale_column", scale.to(torch.bfloat16).float().unsqueeze(1))
        self.bias: torch.Tensor | None = (
            None if linear.bias is None else linear.bias.detach().float())
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        parts = [self._multiply(flat[start:end], dense)
                 for start, end, dense in self._plan.segments_for(flat.shape[0], DENSE_MIN_ROWS)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _multiply(self, rows: torch.Tensor, dense: bool) -> torch.Tensor:
        weight, scale, column = self.weight_int8, self.scale, self.scale_column
        assert isinstance(weight, torch.Tensor)
        assert isinstance(scale, torch.Tensor)
        assert isinstance(column, torch.Tensor)
        if dense:
            return F.linear(rows.float(), weight.float() * column)
        return torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), weight,
                                         scale).float()

    def nbytes(self) -> int:
        weight, scale, column = self.weight_int8, self.scale, self.scale_column
        assert isinstance(weight, torch.Tensor)
        assert isinstance(scale, torch.Tensor)
        assert isinstance(column, torch.Tensor)
        return (weight.numel() + scale.numel() * scale.element_size()
                + column.numel() * column.element_size())


#: The kernel reads the input in blocks: other widths read past the row (seen: a crash for a
#: width of 172 with more than four rows). Layers of other widths stay in float32.
_WIDTH_MULTIPLE = 32


def quantize_int8(model: DecoderModel) -> int:
    """Replace ``model``'s linear layers with `Int8Linear` in place (the rest in float32);
    returns the bytes the model's weights take afterwards."""
    model.float()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % _WIDTH_MULTIPLE == 0:
                setattr(parent, name, Int8Linear(child, model.row_plan))
    params = {id(p): p for p in model.parameters()}.values()
    size = sum(p.numel() * p.element_size() for p in params)
    return size + sum(m.nbytes() for m in model.modules() if isinstance(m, Int8Linear))
