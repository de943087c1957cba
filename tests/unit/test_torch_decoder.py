"""The decoder's forward pass: KV cache, chunked prefill, batching, RoPE scaling."""

from __future__ import annotations

import math

import pytest
import torch

from neuron.engines.torch_decoder import (
    DecoderConfig,
    DecoderModel,
    RMSNorm,
    RopeScaling,
    rope_inverse_frequencies,
)
from neuron.engines.torch_engine import TorchEngine
from neuron.errors import UnsupportedArchitectureError
from tests.support.tiny_models import TinyModel, build_tiny_llama


def _ignore(fraction: float, what: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-decoder"), seed=1)


@pytest.fixture(scope="module")
def decoder(tiny: TinyModel) -> DecoderModel:
    return TorchEngine(dtype="float32").load(tiny.safetensors_files(), _ignore).decoder


@pytest.fixture(scope="module")
def ids(tiny: TinyModel) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny.vocab_size, (40,), generator=generator).tolist()


def full_forward(decoder: DecoderModel, ids: list[int]) -> torch.Tensor:
    cache = decoder.new_cache(len(ids))
    with torch.inference_mode():
        logits: torch.Tensor = decoder(torch.tensor(ids), [cache], [len(ids)], all_logits=True)
    return logits


def test_kv_cache_decode_equals_a_full_forward(decoder: DecoderModel, ids: list[int]) -> None:
    reference = full_forward(decoder, ids)
    cache = decoder.new_cache(len(ids))
    rows = []
    with torch.inference_mode():
        rows.append(decoder(torch.tensor(ids[:7]), [cache], [7], all_logits=True))  # prefill
        for token in ids[7:]:
            rows.append(decoder(torch.tensor([token]), [cache], [1]))
    assert cache.length == len(ids)
    torch.testing.assert_close(torch.cat(rows), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_chunked_prefill_equals_one_pass(decoder: DecoderModel, ids: list[int], chunk: int) -> None:
    reference = full_forward(decoder, ids)
    cache = decoder.new_cache(len(ids))
    rows = []
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            rows.append(decoder(torch.tensor(part), [cache], [len(part)], all_logits=True))
    torch.testing.assert_close(torch.cat(rows), reference, rtol=1e-4, atol=1e-4)


def test_last_token_logits_by_default(decoder: DecoderModel, ids: list[int]) -> None:
    cache = decoder.new_cache(len(ids))
    with torch.inference_mode():
        last = decoder(torch.tensor(ids), [cache], [len(ids)])
    assert last.shape == (1, decoder.config.vocab_size)
    assert last.dtype == torch.float32
    torch.testing.assert_close(last[0], full_forward(decoder, ids)[-1], rtol=1e-4, atol=1e-4)


def test_a_batch_of_sequences_equals_each_alone(decoder: DecoderModel, ids: list[int]) -> None:
    a, b = ids[:25], ids[25:]
    # Sequence a is mid-decode (cache already holds 24 tokens), b is a fresh prefill.
    cache_a, cache_b = decoder.new_cache(len(a)), decoder.new_cache(len(b))
    with torch.inference_mode():
        decoder(torch.tensor(a[:-1]), [cache_a], [len(a) - 1])
        batched = decoder(torch.tensor([a[-1], *b]), [cache_a, cache_b], [1, len(b)])
    assert (cache_a.length, cache_b.length) == (len(a), len(b))
    torch.testing.assert_close(batched[0], full_forward(decoder, a)[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1], full_forward(decoder, b)[-1], rtol=1e-4, atol=1e-4)


def test_cache_overflow_is_refused(decoder: DecoderModel) -> None:
    cache = decoder.new_cache(2)
    with torch.inference_mode(), pytest.raises(ValueError, match="do not fit"):
        decoder(torch.tensor([1, 2, 3]), [cache], [3])
    assert cache.length == 0


def _config(**changes: object) -> DecoderConfig:
    base: dict[str, object] = {
        "architecture": "llama",
        "vocab_size": 10,
        "hidden_size": 64,
        "intermediate_size": 32,
        "num_layers": 1,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 64,
        "context_length": 128,
        "rope_theta": 500000.0,
    }
    base.update(changes)
    return DecoderConfig(**base)  # type: ignore[arg-type]


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies() -> None:
    plain = rope_inverse_frequencies(_config())
    scaling = RopeScaling(
        kind="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_context_length=8192,
    )
    scaled = rope_inverse_frequencies(_config(rope_scaling=scaling))
    wavelength = 2 * math.pi / plain
    high = wavelength < 8192 / 4.0
    low = wavelength > 8192 / 1.0
    assert high.any() and low.any()
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8.0)
    medium = ~high & ~low
    assert ((scaled[medium] < plain[medium]) & (scaled[medium] > plain[medium] / 8.0)).all()


def test_linear_rope_scaling_and_gguf_frequency_factors() -> None:
    plain = rope_inverse_frequencies(_config())
    linear = rope_inverse_frequencies(_config(rope_scaling=RopeScaling(kind="linear", factor=4.0)))
    torch.testing.assert_close(linear, plain / 4.0)
    factors = torch.linspace(1.0, 8.0, plain.shape[0])
    torch.testing.assert_close(rope_inverse_frequencies(_config(), factors), plain / factors)


def test_unknown_rope_scaling_and_bad_head_counts_are_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="dynamic"):
        rope_inverse_frequencies(_config(rope_scaling=RopeScaling(kind="dynamic", factor=2.0)))
    with pytest.raises(UnsupportedArchitectureError):
        _config(num_kv_heads=3)


@pytest.mark.parametrize("shape", [(1, 64), (17, 64), (5, 3, 16)])
def test_the_fused_float32_norm_gives_transformers_numbers(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape) * 3
    # LlamaRMSNorm's formula, operation by operation
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
    assert torch.equal(norm(x), expected)
