"""Prefix reuse in the torch step loop: prompts that start alike compute their common blocks once
(together or one after another, conversation turns included), the retained caches stay within
their budget, and a hash that matches the wrong tokens is never used."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from neuron.engines.base import GenerationParams, Step
from neuron.engines.torch_decoder import DecoderConfig, KVCache
from neuron.engines.torch_engine import TorchEngine, TorchModel
from neuron.engines.torch_prefix import BLOCK, Cached, PrefixIndex, block_hashes
from tests.support.tiny_models import TinyModel, build_tiny_llama
from tests.unit.test_torch_batching import Recorder


def _ignore(fraction: float, what: str) -> None:
    del fraction, what


def _greedy(max_tokens: int) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_llama(tmp_path_factory.mktemp("prefix"), context_length=1024)


def _load(tiny: TinyModel, **engine: object) -> TorchModel:
    return TorchEngine(dtype="float32", **engine).load(  # type: ignore[arg-type]
        tiny.safetensors_files(), _ignore)


@pytest.fixture
def model(tiny: TinyModel) -> Iterator[TorchModel]:
    loaded = _load(tiny, prefill_chunk_tokens=512)
    yield loaded
    loaded.close()


def _system(model: TorchModel, turns: int = 6) -> list[int]:
    return model.encode("You are a careful assistant. Answer briefly and cite sources. " * turns)


def _run(model: TorchModel, prompt: list[int], max_tokens: int = 12) -> list[int]:
    return [item.token_id for item in model.generate(prompt, _greedy(max_tokens), threading.Event())
            if isinstance(item, Step)]


def test_prompts_arriving_together_compute_their_common_blocks_once(
    tiny: TinyModel, model: TorchModel,
) -> None:
    system = _system(model)
    assert len(system) >= 3 * BLOCK
    prompts = [system + model.encode(f" Question {i}: what is {i} plus {i}?") for i in range(6)]
    recorders = [Recorder(f"r{i}") for i in range(6)]
    for prompt, recorder in zip(prompts, recorders, strict=True):
        model.submit(prompt, _greedy(8), recorder.cancelled, recorder)
    together = [r.tokens() for r in recorders]
    shared = (len(system) // BLOCK) * BLOCK
    # the first computes the shared blocks; the five others copy them
    assert model.batching.reused_tokens >= 5 * shared
    cold = _load(tiny, prefill_chunk_tokens=512, prefix_cache_mb=0)
    try:
        assert [_run(cold, p, 8) for p in prompts] == together
    finally:
        cold.close()


def test_the_next_turn_of_a_conversation_reuses_the_previous_turn(
    tiny: TinyModel, model: TorchModel,
) -> None:
    first = _system(model) + model.encode(" Name a colour.")
    answer = _run(model, first, 20)
    before = model.batching.reused_tokens
    second = first + answer + model.encode(" And another one?")
    again = _run(model, second, 12)
    reused = model.batching.reused_tokens - before
    # prompt and answer of the first turn, whole blocks, came from the retained cache
    assert reused == ((len(first) + len(answer) - 1) // BLOCK) * BLOCK
    cold = _load(tiny, prefill_chunk_tokens=512, prefix_cache_mb=0)
    try:
        assert _run(cold, second, 12) == again
        assert cold.batching.reused_tokens == 0
    finally:
        cold.close()


def test_without_a_retention_budget_a_finished_prefix_is_not_kept(tiny: TinyModel) -> None:
    model = _load(tiny, prefill_chunk_tokens=512, prefix_cache_mb=0)
    try:
        prompt = _system(model)
        _run(model, prompt, 4)
        _run(model, prompt, 4)
        assert model.batching.reused_tokens == 0
    finally:
        model.close()


def test_a_repeated_prompt_keeps_one_token_to_compute(model: TorchModel) -> None:
    prompt = _system(model)
    assert _run(model, prompt, 8) == _run(model, prompt, 8)
    # everything but the last token (whole blocks) was copied the second time
    assert model.batching.reused_tokens == ((len(prompt) - 1) // BLOCK) * BLOCK


def _config() -> DecoderConfig:
    return DecoderConfig(architecture="llama", vocab_size=32, hidden_size=8,
                         intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=4, context_length=256)


def _entry(tokens: list[int], filled: int) -> Cached:
    cache = KVCache(_config(), 128, device="cpu", dtype=torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    cache.length = filled
    return Cached(tokens=tokens, cache=cache)


def test_the_index_copies_only_matching_whole_blocks_and_checks_the_tokens() -> None:
    index = PrefixIndex(retain_bytes=0)
    owner = _entry(list(range(40)), filled=40)
    index.register(owner)
    assert len(owner.hashes) == 40 // BLOCK

    same = _entry([*range(35), 99], filled=0)
    assert index.adopt(same, block_hashes(same.tokens), upto=len(same.tokens) - 1) == 2 * BLOCK
    assert same.cache.length == 2 * BLOCK
    assert torch.equal(same.cache.k[:, :, : 2 * BLOCK], owner.cache.k[:, :, : 2 * BLOCK])

    # a forged index entry (a "collision") that points at other tokens is not used
    other = _entry([7] * 40, filled=0)
    forged = block_hashes(other.tokens)
    index._owners[forged[0]] = owner  # simulating a hash collision
    assert index.adopt(other, forged, upto=39) == 0
    assert other.cache.length == 0


def test_retained_caches_stay_within_the_budget_oldest_forgotten_first() -> None:
    one = _entry(list(range(32)), filled=32).cache.nbytes
    index = PrefixIndex(retain_bytes=2 * one)
    entries = [_entry([i] * 32, filled=32) for i in range(3)]
    for entry in entries:
        index.register(entry)
        index.retire(entry)
    assert index.retained_bytes == 2 * one
    assert entries[0].hashes == []  # the oldest was forgotten
    probe = _entry([0] * 32, filled=0)
    assert index.adopt(probe, block_hashes(probe.tokens), upto=31) == 0
    probe = _entry([2] * 32, filled=0)
    assert index.adopt(probe, block_hashes(probe.tokens), upto=31) == BLOCK
