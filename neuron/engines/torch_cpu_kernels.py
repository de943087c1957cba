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
- **Float16 weights times any number of rows** (`Fp16Gemv`). fbgemm's kernels for one and two
  rows sum differently from its kernels for three to six, so `Fp16Linear` padded a lone decode
  row to three (and 7, 14, 31... rows by one or two). This kernel's sums are those of fbgemm's
  three-to-six-row kernels bit for bit for any number of rows (a chain of fused multiply-adds
  over the inputs in order; tests compare it with fbgemm for every layer shape), so nothing is
  padded. Its weights are float16 in panels of 64 outputs, one copy instead of fbgemm's. A lone
  row streams the weights once through a 64-wide kernel: a SmolLM2-135M step of one sequence
  took 27 ms against 36-38 ms with fbgemm's padded rows (both cores). From three rows it is
  within 5% of fbgemm at 16 rows and 15% slower at 32 (both cores; weights streamed from
  memory as in a real step).

They are built on first use with the machine's C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/cortex/kernels`` (``~/.cache``), named by a hash of the source, the flags, the
compiler and the CPU's flags (``-march=native``: the library is for the machine that built
it). Without a compiler, or if the build fails, the engine keeps torch's kernels and the
neuron logs why, once; the float16 kernel needs AVX2, F16C and FMA.
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
from pathlib import Path
from typing import Final

import torch

from neuron.devices import cpu_flags

logger = logging.getLogger(__name__)

SOURCE: Final = Path(__file__).with_suffix(".c")
#: Outputs per float16 weight panel (`Fp16Gemv`).
PANEL: Final = 64
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
        self.fp16_gemv = Fp16Gemv(handle) if handle.cortex_has_fp16_gemv() else None
        """None where the CPU lacks AVX2, F16C or FMA."""


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


class Fp16Gemv:
    """``y = x W^T`` for float16 ``W``, every output a chain of fused multiply-adds over the
    inputs in order: the sums of fbgemm's kernels for three to six rows, for any number of
    rows."""

    def __init__(self, handle: ctypes.CDLL) -> None:
        function = handle.cortex_fp16_gemv
        function.restype = None
        function.argtypes = [_I64, _I64, _PTR, _PTR, _PTR, _I64]
        self._function = function
        rows = handle.cortex_fp16_gemm
        rows.restype = None
        rows.argtypes = [_I64, _I64, _I64, _PTR, _PTR, _PTR, _I64]
        self._rows = rows

    def multiply(self, x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
        """``x W^T`` for ``x`` float32 ``[rows, in]``: ``[rows, panels * PANEL]`` (the padded
        outputs included), on torch's current thread count (the calling thread's,
        `neuron.engines.torch_threads`). One or two rows go a row at a time through the
        64-wide kernel, which reads the weights fastest; more go six at a time."""
        count, in_features, width = panels.shape
        rows = x.shape[0]
        if (x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != in_features
                or panels.dtype != torch.half or not panels.is_contiguous() or width != PANEL):
            raise ValueError("x and the panels disagree")
        x = x.contiguous()
        out = x.new_empty((rows, count * width))
        threads = torch.get_num_threads()
        if rows <= 2:
            for row in range(rows):
                self._function(count, in_features, x[row].data_ptr(), panels.data_ptr(),
                               out[row].data_ptr(), threads)
        else:
            self._rows(rows, count, in_features, x.data_ptr(), panels.data_ptr(),
                       out.data_ptr(), threads)
        return out

    @staticmethod
    def panels(weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (``[out, in]``, float16 values) as the kernel reads it: panels of
        `PANEL` outputs, ``[panels, in, PANEL]`` float16 (outputs padded with zeros)."""
        out_features, in_features = weight.shape
        padded = -out_features % PANEL
        half = torch.cat((weight.half(), weight.new_zeros(padded, in_features, dtype=torch.half)))
        return half.view(-1, PANEL, in_features).transpose(1, 2).contiguous()


class DecodeAttention:
    """`run` does one layer's attention for a step's decoding sequences."""

    def __init__(self, handle: ctypes.CDLL) -> None:
        function = handle.cortex_decode_attention
        function.restype = None
        function.argtypes = [_I64, _I64, _I64, _I64, _I64, ctypes.c_float,
                             _PTR, _PTR, _I64, _PTR, _I64,
                             _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR]
        self._function = function

    def plan(self, rows: Sequence[int], k_caches: Sequence[torch.Tensor],
             v_caches: Sequence[torch.Tensor], positions: Sequence[int],
             group: int) -> DecodePlan:
        """What `run` needs for one step: sequence ``i`` has its one new token at row
        ``rows[i]`` of the step, goes at ``positions[i]`` of caches ``k_caches[i]`` and
        ``v_caches[i]`` (contiguous float32, ``[layers, kv_heads, capacity, head_dim]``)."""
        return DecodePlan(self, rows, k_caches, v_caches, positions, group)


class DecodePlan:
    """One step's decoding sequences, as the kernel reads them (made once per step)."""

    def __init__(self, kernel: DecodeAttention, rows: Sequence[int],
                 k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
                 positions: Sequence[int], group: int) -> None:
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
        self.scratch = torch.empty(group * (max(positions) + 1), dtype=torch.float32)
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
            self.positions.data_ptr(), out.data_ptr(), self.scratch.data_ptr())


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
