"""The CPU decode attention kernel: built on first use, the same numbers as torch's attention
to float32 rounding, exactly the same numbers alone and batched, and torch's attention where it
cannot be built."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from neuron.engines.torch_cpu_attention import (
    DecodeAttention,
    build_decode_attention,
    load_decode_attention,
)
from neuron.engines.torch_decoder import DecoderModel, KVCache
from neuron.engines.torch_engine import TorchEngine, TorchModel
from neuron.engines.torch_quant import fbgemm_fp16_available
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


def _kernel() -> DecodeAttention:
    kernel = load_decode_attention()
    assert kernel is not None, "these machines have a C compiler: the kernel must build"
    return kernel


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


def test_the_engine_uses_the_kernel_for_float32_caches_on_a_cpu(model: TorchModel) -> None:
    assert model.decoder.decode_attention is _kernel()


def test_the_kernel_gives_torch_attentions_numbers(model: TorchModel) -> None:
    decoder = model.decoder
    prompts = [[5, 9, 2, 7, 7, 3], [4, 4, 1], [8, 2, 6, 1, 3], [11, 3]]
    with_kernel = _steps(decoder, prompts, 12)
    decoder.decode_attention = None
    try:
        with_torch = _steps(decoder, prompts, 12)
    finally:
        decoder.decode_attention = _kernel()
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
        assert build_decode_attention(None) is None
        assert build_decode_attention(str(tmp_path / "no-such-cc")) is None
    assert "no C compiler" in caplog.text
    assert "could not build" in caplog.text


def test_a_broken_build_is_reported_not_cached(caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert build_decode_attention("false") is None  # a "compiler" that fails
    assert "false failed" in caplog.text
    assert not list((tmp_path / "cortex" / "kernels").glob("*.so"))
    built = build_decode_attention(str(_kernel_compiler()))
    assert built is not None and built.library.parent == tmp_path / "cortex" / "kernels"


def _kernel_compiler() -> str:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    return compiler


def test_native_attention_false_keeps_torch_attention(tiny: TinyModel) -> None:
    model = TorchEngine(dtype="float32", native_attention=False).load(tiny.safetensors_files(),
                                                                       _ignore)
    try:
        assert model.decoder.decode_attention is None
    finally:
        model.close()
