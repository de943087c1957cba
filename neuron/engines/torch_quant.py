"""Int8 weights for CPUs without fast 16-bit matrix units: every linear layer keeps its weights
as per-output-channel int8 with a bfloat16 scale, and multiplies with torch's weight-only int8
kernel (``_weight_int8pack_mm``); activations stay bfloat16.

On AVX2-only CPUs torch's bfloat16 matrix products take a slow path (about 8 GFLOP/s per core
measured, against 48 for float32), while the int8 weight-only kernel runs at about 43 GFLOP/s and
streams a quarter of float32's bytes each decode step. The activations are never quantised, so a
row's result does not depend on the other rows of the batch: a sequence's greedy output is the
same alone or batched.
"""

from __future__ import annotations

import torch
from torch import nn

from neuron.engines.torch_decoder import DecoderModel


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

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight_int8",
                             torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias: torch.Tensor | None = (
            None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        weight, scale = self.weight_int8, self.scale
        assert isinstance(weight, torch.Tensor)
        assert isinstance(scale, torch.Tensor)
        out = torch._weight_int8pack_mm(flat, weight, scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        weight, scale = self.weight_int8, self.scale
        assert isinstance(weight, torch.Tensor)
        assert isinstance(scale, torch.Tensor)
        return weight.numel() + scale.numel() * scale.element_size()


#: The kernel reads the input in blocks: other widths read past the row (seen: a crash for a
#: width of 172 with more than four rows). Layers of other widths stay in bfloat16.
_WIDTH_MULTIPLE = 32


def quantize_int8(model: DecoderModel) -> int:
    """Replace ``model``'s linear layers with `Int8Linear` in place (the rest in bfloat16);
    returns the bytes the model's weights take afterwards."""
    model.to(torch.bfloat16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % _WIDTH_MULTIPLE == 0:
                setattr(parent, name, Int8Linear(child))
    params = {id(p): p for p in model.parameters()}.values()
    size = sum(p.numel() * p.element_size() for p in params)
    return size + sum(m.nbytes() for m in model.modules() if isinstance(m, Int8Linear))
