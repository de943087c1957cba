"""The torch engine's CPU kernels (`torch_cpu_kernels.c`), for what torch does slowly or
in a way that breaks batched == solo.

- **Decode attention in one call per layer** (`DecodeAttention`). With 16 sequences decoding,
  each layer made 16 torch attention calls and 32 cache copies, about 40 and 5 µs each of mostly
  fixed cost: a quarter of a 16-sequence step of SmolLM2-135M on a 2-core AMD EPYC. The kernel
  writes every decoding sequence's new key and value into its cache and attends its query, for
  one layer, in one call (0.48 ms for 16 sequences at about 130 positions, against about 0.8 ms
  through torch). Prompt pieces keep torch's attention. Each sequence is computed alone by the
  same code, in float32 with a max-subtracted softmax, so its numbers do not depend on its batch;
  they agree with torch's attention to about 1e-6 (tests).
- **RMSNorm in one call** (`RmsNorm`): torch's fused norm runs six operations inside, about
  25 µs for one row; 61 norms per SmolLM2 step.
- **Float16 weights times any number of rows** (`PanelProduct`). fbgemm's kernels for one and two
  rows sum differently from its kernels for three to six, so `Fp16Linear` padded a lone decode
  row to three (and 7, 14, 31... rows by one or two). This kernel's sums are those of fbgemm's
  three-to-six-row kernels bit for bit for any number of rows (a chain of fused multiply-adds
  over the inputs in order; tests compare it with fbgemm for every layer shape), so nothing is
  padded. Its weights are float16 in panels of 64 outputs, one copy instead of fbgemm's. A lone
  row streams the weights once through a 64-wide kernel: a SmolLM2-135M step of one sequence
  took 27 ms against 36-38 ms with fbgemm's padded rows (both cores). From three rows it is
  within 5% of fbgemm at 16 rows and 15% slower at 32 (both cores; weights streamed from
  memory as in a real step). The same kernel takes float32 weights
  (`neuron.engines.torch_quant.Fp32Linear`, ``quantize = "none"``): MKL's float32 product sums
  a row differently alone and among others (1e-5 apart at 1 and 3 rows), this kernel does not.
- **Whole layers but attention in two calls** (`NativeLayer`), with float16 or float32
  weights:
  ``attention_in`` (input norm, q/k/v product and bias, Qwen3's head norms, RoPE) and
  ``attention_out`` (output product, residual, norm, gate/up product, SiLU times up, down
  product, residual). Through torch these were about forty operations per layer of mostly fixed
  cost (5-10 µs each): 6-8 ms of a 24 ms SmolLM2-135M step of one sequence, 9 ms of a
  16-sequence step. Every row is computed alone, so batched == solo holds; the numbers are
  torch's to float32 rounding (its SiLU and RoPE round differently; tests). A model runs all its
  layers this way or none (`DecoderModel.use_cpu_kernels`), so every pass takes one path. With
  them and the attention below on both cores, steps went from 24 to 15 ms (one sequence) and
  from 81-91 to 56-65 ms (16 sequences).
- Decode attention shares the sequences' key/value heads out over the product threads, and
  its softmax and SiLU use an eight-wide ``exp`` (Cephes' polynomial) instead of ``expf``.

They are built on first use with the machine's C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/cortex/kernels`` (``~/.cache``), named by a hash of the source, the flags, the
compiler and the CPU's flags (``-march=native``: the library is for the machine that built
it). Without a compiler, or if the build fails, the engine keeps torch's kernels and the
neuron logs why, once; the products and whole layers need AVX2, F16C and FMA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import torch

from neuron.devices import cpu_flags

logger = logging.getLogger(__name__)

SOURCE: Final = Path(__file__).with_suffix(".c")
#: Outputs per weight panel (`PanelProduct`).
PANEL: Final = 64
#: Outputs per strip of a panel: a panel is `PANEL` // `STRIP` strips, one after another.
STRIP: Final = 16
#: The weight types `PanelProduct` takes.
PANEL_DTYPES: Final = (torch.half, torch.float32)
FLAGS: Final = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
_BUILD_TIMEOUT_S: Final = 120
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def kernel_cache_dir() -> Path:
    """Where built kernels are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cortex" / "kernels"


class CpuKernels:
    """The built library."""

    def __init__(self, library: Path) -> None:
        self.library = library
        handle = ctypes.CDLL(str(library))
        self.decode_attention = DecodeAttention(handle)
        self.rms_norm = RmsNorm(handle)
        self.panel_product = PanelProduct(handle) if handle.cortex_has_panel_product() else None
        """None where the CPU lacks AVX2, F16C or FMA."""
        self._handle = handle

    def native_layer(self, weights: LayerWeights, threads: int) -> NativeLayer | None:
        """``weights`` as a `NativeLayer` whose products run on ``threads`` threads; None where
        the CPU lacks AVX2, F16C or FMA (the layer kernels use `PanelProduct`'s)."""
        if self.panel_product is None:
            return None
        return NativeLayer(self._handle, weights, threads)


class RmsNorm:
    """RMSNorm of float32 rows in one call (torch's fused norm is six operations inside)."""

    def __init__(self, handle: ctypes.CDLL) -> None:
        function = handle.cortex_rms_norm
        function.restype = None
        function.argtypes = [_I64, _I64, _PTR, _PTR, ctypes.c_float, _PTR]
        self._function = function

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``weight * x / sqrt(mean(x ** 2) + eps)`` over the last dimension of float32 ``x``."""
        size = x.shape[-1]
        if (x.dtype != torch.float32 or weight.dtype != torch.float32
                or weight.shape != (size,) or not weight.is_contiguous()):
            raise ValueError("x and the weight disagree")
        x = x.contiguous()
        out = torch.empty_like(x)
        self._function(x.numel() // size, size, x.data_ptr(), weight.data_ptr(), eps,
                       out.data_ptr())
        return out


class PanelProduct:
    """``y = x W^T`` for float16 or float32 ``W`` kept as panels (`panels`), every output a
    chain of fused multiply-adds over the inputs in order, whatever the number of rows: for
    float16 the sums of fbgemm's kernels for three to six rows. (MKL's float32 products sum a
    row differently alone and among others: about 1e-5 apart at 1 and 3 rows.)"""

    def __init__(self, handle: ctypes.CDLL) -> None:
        function = handle.cortex_panel_product
        function.restype = None
        function.argtypes = [_I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64]
        self._function = function

    def multiply(self, x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
        """``x W^T`` for ``x`` float32 ``[rows, in]``: ``[rows, panels * PANEL]`` (the padded
        outputs included), on torch's current thread count (the calling thread's,
        `neuron.engines.torch_threads`). One or two rows go a row at a time through the
        64-wide kernel, which reads the weights fastest; more go six at a time."""
        count, strips, in_features, width = panels.shape
        rows = x.shape[0]
        if (x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != in_features
                or panels.dtype not in PANEL_DTYPES or not panels.is_contiguous()
                or (strips, width) != (PANEL // STRIP, STRIP)):
            raise ValueError("x and the panels disagree")
        x = x.contiguous()
        out = x.new_empty((rows, count * PANEL))
        self._function(rows, count, in_features, x.data_ptr(), panels.data_ptr(),
                       panels.dtype == torch.float32, out.data_ptr(), torch.get_num_threads())
        return out

    def linear(self, x: torch.Tensor, panels: torch.Tensor, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T + b``, ``[rows, out_features]`` (`multiply` without the padded outputs)."""
        out = self.multiply(x, panels)[:, :out_features]
        return out if bias is None else out + bias

    @staticmethod
    def panels(weight: torch.Tensor, dtype: torch.dtype = torch.half) -> torch.Tensor:
        """``weight`` (``[out, in]``) in ``dtype`` (float16 or float32) as the kernel reads
        it: panels of `PANEL` outputs, each `STRIP`-output strips one after another,
        ``[panels, PANEL / STRIP, in, STRIP]`` (outputs padded with zeros). A strip is one
        stream of memory for the kernels (a whole panel row-major, ``[in, PANEL]``, made them
        skip through memory: 13.5 against 19 GB/s for one row on one core, 49 against 63
        GFLOP/s for 16 rows)."""
        if dtype not in PANEL_DTYPES:
            raise ValueError(f"no panels of {dtype}")
        out_features, in_features = weight.shape
        padded = -out_features % PANEL
        typed = torch.cat((weight.to(dtype), weight.new_zeros(padded, in_features, dtype=dtype)))
        return typed.view(-1, PANEL // STRIP, STRIP, in_features).transpose(2, 3).contiguous()


class DecodeAttention:
    """`run` does one layer's attention for a step's decoding sequences."""

    def __init__(self, handle: ctypes.CDLL) -> None:
        function = handle.cortex_decode_attention
        function.restype = None
        function.argtypes = [_I64, _I64, _I64, _I64, _I64, ctypes.c_float,
                             _PTR, _PTR, _I64, _PTR, _I64,
                             _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64]
        self._function = function

    def plan(self, rows: Sequence[int], k_caches: Sequence[torch.Tensor],
             v_caches: Sequence[torch.Tensor], positions: Sequence[int],
             group: int, threads: int) -> DecodePlan:
        """What `run` needs for one step: sequence ``i`` has its one new token at row
        ``rows[i]`` of the step, goes at ``positions[i]`` of caches ``k_caches[i]`` and
        ``v_caches[i]`` (contiguous float32, ``[layers, kv_heads, capacity, head_dim]``); the
        sequences' key/value heads are shared out over ``threads`` OpenMP threads."""
        return DecodePlan(self, rows, k_caches, v_caches, positions, group, threads)


class DecodePlan:
    """One step's decoding sequences, as the kernel reads them (made once per step)."""

    def __init__(self, kernel: DecodeAttention, rows: Sequence[int],
                 k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
                 positions: Sequence[int], group: int, threads: int) -> None:
        for cache in (*k_caches, *v_caches):
            if cache.dtype != torch.float32 or not cache.is_contiguous() or cache.is_cuda:
                raise ValueError("the CPU decode kernel takes contiguous float32 CPU caches")
        count = len(rows)
        self.kernel = kernel
        self.count = count
        self.rows = torch.tensor(list(rows), dtype=torch.int64)
        self.capacities = torch.tensor([c.shape[2] for c in k_caches], dtype=torch.int64)
        self.positions = torch.tensor(list(positions), dtype=torch.int64)
        self.k_caches = (_PTR * count)(*[c.data_ptr() for c in k_caches])
        self.v_caches = (_PTR * count)(*[c.data_ptr() for c in v_caches])
        self.threads = threads
        self.scratch_stride = group * (max(positions) + 1)
        self.scratch = torch.empty(threads * self.scratch_stride, dtype=torch.float32)
        self._keep = (tuple(k_caches), tuple(v_caches))  # the pointers stay valid

    def run(self, layer: int, qk: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Attention at ``layer`` for the planned sequences.

        Args:
            qk: ``[tokens, heads + kv_heads, head_dim]``, queries then keys (after RoPE).
            v: ``[tokens, kv_heads, head_dim]``.
            out: ``[tokens, heads, head_dim]``, contiguous; the planned rows are written.
        """
        tokens, heads, dim = out.shape
        kv_heads = v.shape[1]
        for tensor in (qk, v):
            if tensor.dtype != torch.float32 or tensor.stride(2) != 1 or tensor.stride(1) != dim:
                raise ValueError("the CPU decode kernel takes float32 rows of whole heads")
        if not out.is_contiguous() or qk.shape[0] != tokens or v.shape[0] != tokens:
            raise ValueError("qk, v and out disagree")
        self.kernel._function(
            self.count, heads, kv_heads, dim, layer, dim ** -0.5,
            qk.data_ptr(), qk[:, heads:].data_ptr(), qk.stride(0), v.data_ptr(), v.stride(0),
            self.rows.data_ptr(), self.k_caches, self.v_caches, self.capacities.data_ptr(),
            self.positions.data_ptr(), out.data_ptr(), self.scratch.data_ptr(),
            self.scratch_stride, self.threads)



@runtime_checkable
class PanelledLinear(Protocol):
    """A linear layer that can keep its weights as `PanelProduct` panels
    (`neuron.engines.torch_quant.Fp16Linear` and ``Fp32Linear``)."""

    @property
    def panels(self) -> torch.Tensor | None:
        """The panels; None where the layer runs another kernel."""

    @property
    def bias_values(self) -> torch.Tensor | None:
        """The float32 bias, if any."""


class _LayerStruct(ctypes.Structure):
    """``cortex_layer`` in the C file (the same fields in the same order)."""

    _fields_ = [*[(name, _I64) for name in ("hidden", "heads", "kv_heads", "dim", "intermediate",
                                            "qkv_panels", "o_panels", "gate_up_panels",
                                            "down_panels", "float32")],
                ("eps", ctypes.c_double),
                *[(name, _PTR) for name in ("input_norm", "post_norm", "q_norm", "k_norm",
                                            "qkv_bias", "qkv", "o", "gate_up", "down")]]


@dataclass(frozen=True, kw_only=True)
class LayerWeights:
    """One decoder layer as `NativeLayer` reads it: float32 norm weights and bias, the linear
    layers as panels, all float16 or all float32 (`PanelProduct.panels`)."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class LayerScratch:
    """One forward pass's buffers for `NativeLayer` calls, shared by every layer of a model
    (the calls run one after another): ``rows`` rows."""

    def __init__(self, rows: int, hidden: int, qkv_width: int, wide: int, intermediate: int,
                 cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        self.rows = rows
        self.cos = cos.contiguous()
        self.signed_sin = signed_sin.contiguous()
        self.normed = torch.empty((rows, hidden))
        self.qkv = torch.empty((rows, qkv_width))
        self.wide = torch.empty((rows, wide))
        self.act = torch.empty((rows, intermediate))


class NativeLayer:
    """A whole decoder layer but attention in two calls (`attention_in`, `attention_out`), for
    float32 activations and float16 or float32 weights: the norms, the products
    (`PanelProduct`'s sums), biases, RoPE, SiLU and the residual adds that torch runs as about
    forty operations of mostly fixed cost per layer (a third of a SmolLM2-135M decode step of
    one sequence on a CPU). Every row is computed alone, so a sequence's numbers do not depend
    on its batch."""

    def __init__(self, handle: ctypes.CDLL, weights: LayerWeights, threads: int) -> None:
        hidden = weights.input_norm.shape[0]
        dim = weights.head_dim
        dtype = weights.qkv.dtype
        for tensor in (weights.qkv, weights.o, weights.gate_up, weights.down):
            if (tensor.dtype not in PANEL_DTYPES or tensor.dtype != dtype
                    or not tensor.is_contiguous() or tensor.dim() != 4
                    or tuple(tensor.shape[1::2]) != (PANEL // STRIP, STRIP)):
                raise ValueError("the layer's products must be panels, all of one type")
        inner = weights.down.shape[2]
        qkv_outputs = (weights.heads + 2 * weights.kv_heads) * dim
        if (weights.qkv.shape[2] != hidden or weights.o.shape[2] != weights.heads * dim
                or weights.gate_up.shape[2] != hidden
                or PANEL * weights.qkv.shape[0] < qkv_outputs
                or PANEL * weights.o.shape[0] < hidden or PANEL * weights.down.shape[0] < hidden
                or PANEL * weights.gate_up.shape[0] < 2 * inner or dim % 2):
            raise ValueError("the layer's shapes disagree")
        vectors = [weights.input_norm, weights.post_norm, weights.q_norm, weights.k_norm,
                   weights.qkv_bias]
        sizes = [hidden, hidden, dim, dim, qkv_outputs]
        if (weights.q_norm is None) != (weights.k_norm is None):
            raise ValueError("per-head norms come for both q and k or neither")
        for vector, size in zip(vectors, sizes, strict=True):
            if vector is not None and (vector.dtype != torch.float32 or vector.shape != (size,)
                                       or not vector.is_contiguous()):
                raise ValueError("norm weights and biases must be contiguous float32 vectors "
                                 "of the layer's sizes")
        self.weights = weights  # the pointers below stay valid
        self.hidden, self.intermediate, self.threads = hidden, inner, threads
        self.qkv_outputs = qkv_outputs
        self.qkv_width = PANEL * weights.qkv.shape[0]
        self.wide = PANEL * max(weights.o.shape[0], weights.gate_up.shape[0],
                                weights.down.shape[0])

        def pointer(tensor: torch.Tensor | None) -> int | None:
            return None if tensor is None else tensor.data_ptr()

        self._struct = _LayerStruct(
            hidden, weights.heads, weights.kv_heads, dim, inner, weights.qkv.shape[0],
            weights.o.shape[0], weights.gate_up.shape[0], weights.down.shape[0],
            dtype == torch.float32, weights.eps,
            *[pointer(tensor) for tensor in vectors],
            *[pointer(tensor) for tensor in (weights.qkv, weights.o, weights.gate_up,
                                             weights.down)])
        self._address = ctypes.addressof(self._struct)
        self._in = handle.cortex_layer_attention_in
        self._in.restype = None
        self._in.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64]
        self._out = handle.cortex_layer_attention_out
        self._out.restype = None
        self._out.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64]

    def scratch(self, rows: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> LayerScratch:
        """Buffers for a pass of ``rows`` rows, with its RoPE tables (``[rows, 1, head_dim]``,
        the sine's first half negated)."""
        dim = self.weights.head_dim
        if cos.shape != (rows, 1, dim) or signed_sin.shape != (rows, 1, dim):
            raise ValueError("the RoPE tables disagree with the rows")
        return LayerScratch(rows, self.hidden, self.qkv_width, self.wide, self.intermediate,
                            cos.float(), signed_sin.float())

    def attention_in(self, x: torch.Tensor, scratch: LayerScratch) -> torch.Tensor:
        """The input norm, q/k/v product, Qwen3's head norms and RoPE of ``x`` (``[rows,
        hidden]``, contiguous float32): ``[rows, (heads + 2 kv_heads) head_dim]`` (a view of
        ``scratch``, overwritten by the next layer), q heads, then k, then v."""
        self._check(x, scratch)
        self._in(self._address, scratch.rows, x.data_ptr(), scratch.cos.data_ptr(),
                 scratch.signed_sin.data_ptr(), scratch.normed.data_ptr(),
                 scratch.qkv.data_ptr(), self.threads)
        return scratch.qkv[:, : self.qkv_outputs]

    def attention_out(self, x: torch.Tensor, attended: torch.Tensor,
                      scratch: LayerScratch) -> None:
        """``x += attended Wo``, then ``x += down(silu(gate(n)) * up(n))`` with ``n`` the
        post-attention norm of ``x``; in place. ``attended``: ``[rows, heads * head_dim]``."""
        self._check(x, scratch)
        heads_width = self.weights.heads * self.weights.head_dim
        if (attended.dtype != torch.float32 or attended.shape != (scratch.rows, heads_width)
                or not attended.is_contiguous()):
            raise ValueError("the attention output disagrees with the layer")
        self._out(self._address, scratch.rows, x.data_ptr(), attended.data_ptr(),
                  scratch.normed.data_ptr(), scratch.wide.data_ptr(), scratch.act.data_ptr(),
                  self.threads)

    def _check(self, x: torch.Tensor, scratch: LayerScratch) -> None:
        if (x.dtype != torch.float32 or x.shape != (scratch.rows, self.hidden)
                or not x.is_contiguous() or scratch.qkv.shape[1] != self.qkv_width
                or scratch.wide.shape[1] < self.wide):
            raise ValueError("x or the scratch disagree with the layer")


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join(
        [source, " ".join(FLAGS).encode(), compiler.encode(),
         " ".join(sorted(cpu_flags())).encode()]))
    target = kernel_cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=_BUILD_TIMEOUT_S, check=False)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        built.replace(target)  # atomic: another neuron building it too is harmless
    return target


def build_cpu_kernels(compiler: str | None) -> CpuKernels | None:
    """The kernels built with ``compiler`` (or found already built); None, with the reason
    logged, where there is no compiler or the build or the load fails. Blocking."""
    if compiler is None:
        logger.warning("no C compiler (cc): the torch engine's CPU kernels are not built; "
                       "torch's are used, slower")
        return None
    try:
        return CpuKernels(_build(compiler))
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        logger.warning("could not build the torch engine's CPU kernels (%s); torch's are used "
                       "instead", exc)
        return None


@functools.cache
def load_cpu_kernels() -> CpuKernels | None:
    """`build_cpu_kernels` with ``$CC``, else ``cc`` or ``gcc``, once per process."""
    return build_cpu_kernels(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
