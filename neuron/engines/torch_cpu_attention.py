"""Decode attention on a CPU in one native call per layer (`torch_cpu_attention.c`).

With 16 sequences decoding, each layer made 16 torch attention calls and 32 cache copies, about
40 and 5 µs each of mostly fixed cost: a quarter of a 16-sequence step of SmolLM2-135M on a
2-core AMD EPYC. The kernel writes every decoding sequence's new key and value into its cache
and attends its query, for one layer, in one call (0.48 ms for 16 sequences at about 130
positions, against about 0.8 ms through torch). Prompt pieces keep torch's attention.

It is built on first use with the machine's C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/cortex/kernels`` (``~/.cache``), named by a hash of the source, the flags, the
compiler and the CPU's flags (``-march=native``: the library is for the machine that built
it). Without a compiler, or if the build fails, the decoder keeps torch's attention and the
neuron logs why, once.

Each sequence is computed alone by the same code, in float32 with a max-subtracted softmax, so
a sequence's numbers still do not depend on its batch; they agree with torch's attention to
about 1e-6 (tests).
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

logger = logging.getLogger(__name__)

SOURCE: Final = Path(__file__).with_suffix(".c")
FLAGS: Final = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC")
_BUILD_TIMEOUT_S: Final = 120
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def kernel_cache_dir() -> Path:
    """Where built kernels are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cortex" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


class DecodeAttention:
    """The built kernel: `run` does one layer's attention for a step's decoding sequences."""

    def __init__(self, library: Path) -> None:
        self.library = library
        function = ctypes.CDLL(str(library)).cortex_decode_attention
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
        [source, " ".join(FLAGS).encode(), compiler.encode(), _cpu_flags().encode()]))
    target = kernel_cache_dir() / f"decode_attention-{key.hexdigest()[:16]}.so"
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


def build_decode_attention(compiler: str | None) -> DecodeAttention | None:
    """The kernel built with ``compiler`` (or found already built); None, with the reason
    logged, where there is no compiler or the build or the load fails. Blocking."""
    if compiler is None:
        logger.warning("no C compiler (cc): CPU decode attention stays on torch's kernel, "
                       "slower with many sequences")
        return None
    try:
        return DecodeAttention(_build(compiler))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("could not build the CPU decode attention kernel (%s); torch's kernel "
                       "is used instead", exc)
        return None


@functools.cache
def load_decode_attention() -> DecodeAttention | None:
    """`build_decode_attention` with ``$CC``, else ``cc`` or ``gcc``, once per process."""
    return build_decode_attention(
        os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
