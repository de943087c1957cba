"""The CPU decode attention kernel: built on first use, the same numbers as torch's attention
to float32 rounding, exactly the same numbers alone and batched, and torch's attention where it
cannot be built."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from neuron.engines.torch_cpu_kernels import (
    FLAGS,
    SOURCE,
    CpuKernels,
    DecodeAttention,
    NativeLayer,
    PanelProduct,
    build_cpu_kernels,
    load_cpu_kernels,
)
from neuron.engines.torch_decoder import (
    DecoderConfig,
    DecoderLayer,
    DecoderModel,
    KVCache,
    RMSNorm,
)
from neuron.engines.torch_engine import TorchEngine, TorchModel
from neuron.engines.torch_quant import (
    Fp16Linear,
    Fp32Linear,
    fbgemm_fp16_available,
    float32_panels,
    quantize,
)
from tests.support.tiny_models import TinyModel, build_tiny_llama


def _ignore(fraction: float, what: str) -> None:
    del fraction, what


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_llama(tmp_path_factory.mktemp("cpu-attention"), seed=3)


@pytest.fixture(scope="module")
def model(tiny: TinyModel) -> TorchModel:
    """float16 weights, float32 activations: the CPU default, and the one whose linear layers
    give a row the same numbers in any batch (float32 weights through MKL do not: 1 row and 3
    rows differ in the last bits), so the batch checks below see only the attention."""
    if not fbgemm_fp16_available():
        pytest.skip("this torch build has no fbgemm")
    return TorchEngine(quantize="fp16").load(tiny.safetensors_files(), _ignore)


def _kernels() -> CpuKernels:
    kernels = load_cpu_kernels()
    assert kernels is not None, "these machines have a C compiler: the kernels must build"
    return kernels


def _steps(decoder: DecoderModel, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill ``prompts`` together, the first one a step late (so one step mixes a prompt
    piece with decoding rows), then decode greedily; every step's logits."""
    caches = [decoder.new_cache(64) for _ in prompts]
    seen: list[torch.Tensor] = []
    with torch.inference_mode():
        logits = decoder(torch.tensor([t for p in prompts[1:] for t in p]), caches[1:],
                         [len(p) for p in prompts[1:]])
        seen.append(logits)
        tokens = logits.argmax(-1).tolist()
        logits = decoder(torch.tensor([*prompts[0], *tokens]), caches,
                         [len(prompts[0]), *[1] * len(tokens)])
        seen.append(logits)
        for _ in range(steps):
            logits = decoder(logits.argmax(-1), caches, [1] * len(prompts))
            seen.append(logits)
    return seen


def _steps_with_attention(decoder: DecoderModel, attention: DecodeAttention | None,
                          prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """`_steps` with ``attention`` as the decoder's decode attention (None: torch's)."""
    decoder.decode_attention = attention
    try:
        return _steps(decoder, prompts, steps)
    finally:
        decoder.decode_attention = _kernels().decode_attention


def test_the_engine_uses_the_kernel_for_float32_caches_on_a_cpu(model: TorchModel) -> None:
    assert model.decoder.decode_attention is _kernels().decode_attention


def test_the_kernel_gives_torch_attentions_numbers(model: TorchModel) -> None:
    decoder = model.decoder
    prompts = [[5, 9, 2, 7, 7, 3], [4, 4, 1], [8, 2, 6, 1, 3], [11, 3]]
    with_kernel = _steps(decoder, prompts, 12)
    with_torch = _steps_with_attention(decoder, None, prompts, 12)
    for ours, theirs in zip(with_kernel, with_torch, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_a_sequence_gets_the_same_numbers_alone_and_batched(model: TorchModel) -> None:
    """Decode steps of three sequences together and of each alone, from the same caches (the
    engine's batching tests check whole generations the same way)."""
    decoder = model.decoder
    prompts = [[5, 9, 2, 7, 7, 3], [4, 4, 1], [8, 2, 6, 1, 3]]

    def prefilled() -> tuple[list[KVCache], list[int]]:
        caches = [decoder.new_cache(64) for _ in prompts]
        firsts = [int(decoder(torch.tensor(p), [c], [len(p)]).argmax()) for p, c in
                  zip(prompts, caches, strict=True)]
        return caches, firsts

    with torch.inference_mode():
        caches, tokens = prefilled()
        together = []
        for _ in range(8):
            logits = decoder(torch.tensor(tokens), caches, [1, 1, 1])
            together.append(logits)
            tokens = logits.argmax(-1).tolist()
        for index in range(3):
            caches, firsts = prefilled()
            token = firsts[index]
            for step in range(8):
                logits = decoder(torch.tensor([token]), [caches[index]], [1])
                assert torch.equal(logits[0], together[step][index]), (index, step)
                token = int(logits.argmax())


def test_without_a_compiler_torch_attention_stays(caplog: pytest.LogCaptureFixture,
                                                  tmp_path: Path) -> None:
    with caplog.at_level(logging.WARNING):
        assert build_cpu_kernels(None) is None
        assert build_cpu_kernels(str(tmp_path / "no-such-cc")) is None
    assert "no C compiler" in caplog.text
    assert "could not build" in caplog.text


def test_a_broken_build_is_reported_not_cached(caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert build_cpu_kernels("false") is None  # a "compiler" that fails
    assert "false failed" in caplog.text
    assert not list((tmp_path / "cortex" / "kernels").glob("*.so"))
    built = build_cpu_kernels(str(_kernel_compiler()))
    assert built is not None and built.library.parent == tmp_path / "cortex" / "kernels"


def _kernel_compiler() -> str:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    return compiler


def test_native_kernels_false_keeps_torch_attention(tiny: TinyModel) -> None:
    model = TorchEngine(dtype="float32", native_kernels=False).load(tiny.safetensors_files(),
                                                                       _ignore)
    try:
        assert model.decoder.decode_attention is None
    finally:
        model.close()


def _product() -> PanelProduct:
    product = _kernels().panel_product
    assert product is not None, "these machines have AVX2, F16C and FMA"
    return product


@pytest.mark.parametrize(("out_features", "in_features", "bias"),
                         [(960, 576, False), (576, 1536, False), (3072, 576, True),
                          (100, 64, True), (49152, 576, False)])
def test_the_kernel_gives_every_row_the_numbers_fbgemm_gives_it_in_a_batch(
        out_features: int, in_features: int, bias: bool) -> None:
    """Alone, as one of two (fbgemm's own one- and two-row kernels sum differently), or in
    any larger call; and it keeps one copy of the weights."""
    if not fbgemm_fp16_available():
        pytest.skip("this torch build has no fbgemm")
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(3)  # weights that float16 rounds
    kernel, plain = Fp16Linear(linear, _product()), Fp16Linear(linear)
    x = torch.randn(40, in_features)
    batch = plain(x)  # forty rows: blocks of six and four, none of one or two
    with torch.inference_mode():
        for rows in (1, 2, 3, 7, 16, 40):
            assert torch.equal(kernel(x[:rows]), batch[:rows]), rows
    padded_outputs = -out_features % 64
    assert plain.nbytes() <= kernel.nbytes() <= plain.nbytes() + 2 * in_features * padded_outputs


def test_the_engine_gives_float16_layers_the_kernel(tiny: TinyModel) -> None:
    if not fbgemm_fp16_available():
        pytest.skip("this torch build has no fbgemm")
    with_kernel = TorchEngine(quantize="fp16").load(tiny.safetensors_files(), _ignore)
    without = TorchEngine(quantize="fp16", native_kernels=False).load(tiny.safetensors_files(),
                                                                       _ignore)
    try:
        layers = [m for m in with_kernel.decoder.modules() if isinstance(m, Fp16Linear)]
        assert layers and all(m.uses_panels for m in layers)
        assert not any(m.uses_panels for m in without.decoder.modules()
                       if isinstance(m, Fp16Linear))
        # one copy of the weights either way (the kernel's panels pad outputs to 64)
        assert 0 <= with_kernel.info.memory_bytes - without.info.memory_bytes < 0.05 * (
            without.info.memory_bytes)
        # whole layers in the kernels only where the products are: the same numbers to
        # float32 rounding (the kernels' SiLU and RoPE round differently from torch's)
        without.decoder.use_cpu_kernels(_kernels())
        assert all(layer.native is not None for layer in with_kernel.decoder.layers)
        assert all(layer.native is None for layer in without.decoder.layers)
        prompt = torch.arange(3, 30)
        with torch.inference_mode():
            logits = []
            for model in (with_kernel, without):
                cache = model.decoder.new_cache(64)
                first = model.decoder(prompt, [cache], [len(prompt)])
                logits.append(model.decoder(first.argmax(-1), [cache], [1]))
        assert torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)
        assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
    finally:
        with_kernel.close()
        without.close()


def test_the_norm_kernel_gives_the_formulas_numbers_row_by_row(model: TorchModel) -> None:
    norms = [m for m in model.decoder.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.kernel is _kernels().rms_norm for m in norms)
    torch.manual_seed(0)
    weight = torch.rand(576) + 0.5
    x = torch.randn(9, 576) * 4
    together = _kernels().rms_norm(x, weight, 1e-5)
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.allclose(together, expected, rtol=1e-5, atol=1e-6)
    norm = _kernels().rms_norm
    for row in range(9):
        assert torch.equal(norm(x[row : row + 1], weight, 1e-5), together[row : row + 1])
    heads = x.view(9, 9, 64)  # per-head norms (Qwen3's q/k norm) take the last dimension
    assert torch.allclose(_kernels().rms_norm(heads, weight[:64].contiguous(), 1e-6),
                          weight[:64] * (heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True)
                                                             + 1e-6)), rtol=1e-5, atol=1e-6)


def test_without_avx2_the_library_builds_without_the_float16_kernels(
        tmp_path: Path, model: TorchModel) -> None:
    """A CPU without AVX2, F16C or FMA still gets the attention and norm kernels (plain
    loops), and no whole layers."""
    library = tmp_path / "baseline.so"
    flags = [flag for flag in FLAGS if flag != "-march=native"]
    subprocess.run([_kernel_compiler(), *flags, "-march=x86-64", "-o", str(library), str(SOURCE),
                    "-lm"], check=True, capture_output=True, timeout=120)
    kernels = CpuKernels(library)
    assert kernels.panel_product is None
    x, weight = torch.randn(2, 64), torch.rand(64)
    assert torch.allclose(kernels.rms_norm(x, weight, 1e-6), _kernels().rms_norm(x, weight, 1e-6),
                          rtol=1e-5, atol=1e-6)
    layer = _random_decoder(attention_bias=False, qk_norm=False).layers[0]
    assert isinstance(layer, DecoderLayer)
    weights = layer.native_weights()
    assert weights is not None and kernels.native_layer(weights, 1) is None
    decoder = model.decoder
    prompts = [[5, 9, 2, 7, 7, 3], [4, 4, 1], [8, 2, 6, 1, 3]]
    vectorized = _steps(decoder, prompts, 6)
    plain = _steps_with_attention(decoder, kernels.decode_attention, prompts, 6)
    for ours, theirs in zip(plain, vectorized, strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def _random_decoder(*, attention_bias: bool, qk_norm: bool,
                    float32: bool = False) -> DecoderModel:
    """A small decoder with random weights, its linear layers as the kernel's float16 panels
    (the engine's CPU default) or float32 ones, then the CPU kernels: every layer runs in
    them."""
    config = DecoderConfig(architecture="qwen3" if qk_norm else "qwen2" if attention_bias
                           else "llama", vocab_size=300, hidden_size=96, intermediate_size=200,
                           num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
                           context_length=128, attention_bias=attention_bias, qk_norm=qk_norm)
    torch.manual_seed(5)
    decoder = DecoderModel(config)
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) / parameter.shape[-1] ** 0.5)
    decoder.requires_grad_(False)
    if float32:
        float32_panels(decoder, _product())
    else:
        quantize(decoder, "fp16", _product())
    decoder.use_cpu_kernels(_kernels())
    return decoder


@pytest.mark.parametrize(("attention_bias", "qk_norm", "float32"),
                         [(False, False, False), (True, False, False), (False, True, False),
                          (True, False, True)])
def test_whole_layers_in_the_kernels_give_torchs_numbers(attention_bias: bool, qk_norm: bool,
                                                         float32: bool) -> None:
    """Llama, Qwen2's q/k/v biases and Qwen3's head norms, float16 or float32 weights: the
    same logits as the layers through torch (same products, torch's norms, RoPE, SiLU and
    adds) over prefill, mixed and decode steps, and each sequence the same numbers alone as in
    the batch."""
    if not fbgemm_fp16_available():
        pytest.skip("this torch build has no fbgemm")
    decoder = _random_decoder(attention_bias=attention_bias, qk_norm=qk_norm, float32=float32)
    layers = [layer for layer in decoder.layers if isinstance(layer, DecoderLayer)]
    natives = [layer.native for layer in layers]
    assert all(native is not None for native in natives)
    prompts = [[5, 9, 2, 7, 7, 3], [4, 4, 1], [8, 2, 6, 1, 3], [11, 3]]
    in_kernels = _steps(decoder, prompts, 10)
    for layer in layers:
        layer.native = None
    try:
        through_torch = _steps(decoder, prompts, 10)
    finally:
        for layer, native in zip(layers, natives, strict=True):
            layer.native = native
    for ours, theirs in zip(in_kernels, through_torch, strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # alone: the same numbers as in the batch, bit for bit
        for index, prompt in enumerate(prompts):
            cache = decoder.new_cache(64)
            logits = decoder(torch.tensor(prompt), [cache], [len(prompt)])
            for _ in range(10 if index == 0 else 11):  # the first joined the batch a step late
                logits = decoder(logits.argmax(-1), [cache], [1])
            assert torch.equal(logits[0], in_kernels[-1][index]), index


def test_a_layer_refuses_rows_that_do_not_fit_it() -> None:
    if not fbgemm_fp16_available():
        pytest.skip("this torch build has no fbgemm")
    decoder = _random_decoder(attention_bias=False, qk_norm=False)
    native = decoder.layers[0].native
    assert isinstance(native, NativeLayer)
    cos = sin = torch.zeros(2, 1, 16)
    scratch = native.scratch(2, cos, sin)
    with pytest.raises(ValueError, match="disagree"):
        native.attention_in(torch.zeros(3, 96), scratch)
    with pytest.raises(ValueError, match="disagree"):
        native.attention_out(torch.zeros(2, 96), torch.zeros(2, 95), scratch)
    with pytest.raises(ValueError, match="RoPE"):
        native.scratch(3, cos, sin)


def test_float32_weights_give_a_row_the_same_numbers_in_any_batch() -> None:
    """``quantize = "none"`` on a CPU: the kernel's float32 panels (MKL's float32 product sums a
    row differently alone and among others)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1000)
    layer = Fp32Linear(linear, _product())
    x = torch.randn(40, 576)
    with torch.inference_mode():
        batch = layer(x)
        assert torch.allclose(batch, linear(x), rtol=1e-5, atol=1e-5)
        for rows in (1, 2, 3, 7, 16):
            assert torch.equal(layer(x[:rows]), batch[:rows]), rows
    assert layer.nbytes() == 4 * (1024 * 576 + 1000)  # outputs padded to 64


def test_the_engine_keeps_float32_layers_as_panels_and_a_tied_head_shared(
        tmp_path: Path) -> None:
    tied = build_tiny_llama(tmp_path, seed=4, tie_embeddings=True)
    model = TorchEngine(dtype="float32").load(tied.safetensors_files(), _ignore)
    try:
        decoder = model.decoder
        layers = [m for m in decoder.layers.modules() if isinstance(m, Fp32Linear)]
        assert len(layers) == 4 * len(decoder.layers)
        assert all(layer.native is not None for layer in decoder.layers)
        assert decoder.lm_head.weight is decoder.embed_tokens.weight
    finally:
        model.close()
