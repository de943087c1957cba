"""Continuous batching in the torch engine: sequences submitted together decode in one forward
pass per step (the step count proves it), each gives exactly its solo greedy output, a cancel
takes effect at the next step, a long prompt is prefilled a chunk per step while the others keep
decoding, and a batch beyond ``max_batch`` waits for a place."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from neuron.engines.base import STARTED, Finish, GenerationParams, Started, Step
from neuron.engines.torch_decoder import RowPlan
from neuron.engines.torch_engine import TorchEngine, TorchModel
from neuron.engines.torch_quant import (
    Fp16Linear,
    Int4Linear,
    Int8Linear,
    cpu_has_fast_bf16,
    fbgemm_fp16_available,
    fp16_rows,
)
from tests.support.tiny_models import TinyModel, build_tiny_llama

DTYPE = "float32"
"""The exactness checks also run in bfloat16 (the CPU default) below."""


def _ignore(fraction: float, what: str) -> None:
    del fraction, what


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_llama(tmp_path_factory.mktemp("batching"), context_length=1024)


def _load(tiny: TinyModel, **engine: object) -> TorchModel:
    return TorchEngine(dtype=DTYPE, **engine).load(  # type: ignore[arg-type]
        tiny.safetensors_files(), _ignore)


@pytest.fixture
def model(tiny: TinyModel) -> Iterator[TorchModel]:
    loaded = _load(tiny, prefill_chunk_tokens=16)
    yield loaded
    loaded.close()


class Recorder:
    """Collects one sequence's items as the step loop emits them."""

    def __init__(self, name: str, log: list[tuple[str, object]] | None = None,
                 cancel_after: int | None = None) -> None:
        self.name = name
        self.items: list[object] = []
        self.done = threading.Event()
        self.cancelled = threading.Event()
        self._log = log
        self._cancel_after = cancel_after

    def __call__(self, item: Started | Step | Finish | BaseException) -> None:
        self.items.append(item)
        if self._log is not None:
            self._log.append((self.name, item))
        if self._cancel_after is not None and len(self.steps) == self._cancel_after:
            self.cancelled.set()
        if isinstance(item, Finish | BaseException):
            self.done.set()

    @property
    def steps(self) -> list[Step]:
        return [i for i in self.items if isinstance(i, Step)]

    @property
    def finish(self) -> Finish:
        assert self.done.wait(60), f"{self.name} never finished"
        last = self.items[-1]
        assert isinstance(last, Finish), last
        return last

    def tokens(self) -> list[int]:
        self.finish  # noqa: B018 - waits for the end
        return [s.token_id for s in self.steps]


def _prompts(model: TorchModel, n: int) -> list[list[int]]:
    words = ["Paris", "France", "capital", "The", "is", "of", "cat", "sat"]
    return [model.encode(" ".join(words[i % len(words):] + words[: i % len(words)]) * (1 + i % 3))
            for i in range(n)]


def _greedy(max_tokens: int) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.0)


@pytest.mark.parametrize(("dtype", "quantize", "chunk"), [
    ("float32", "none", 16), ("bfloat16", "none", 16), ("auto", "int8", 16),
    # prompt pieces of 8+ rows take the dequantised float32 path, decode rows and shorter
    # pieces the int8 / int4 kernel (chunks of 16 and 64 mix both)
    ("auto", "int8", 64),
    ("auto", "int4", 16), ("auto", "int4", 64),
    # float16 weights: every row of a step in one fbgemm call, so 1 to 8+ rows per step
    ("auto", "fp16", 16), ("auto", "fp16", 64),
])
def test_eight_sequences_decode_together_and_each_equals_its_solo_output(
    tiny: TinyModel, dtype: str, quantize: str, chunk: int,
) -> None:
    model = TorchEngine(dtype=dtype, prefill_chunk_tokens=chunk,
                        quantize=quantize).load(tiny.safetensors_files(),  # type: ignore[arg-type]
                                                _ignore)
    try:
        _check_batched_equals_solo(model)
    finally:
        model.close()


def _check_batched_equals_solo(model: TorchModel) -> None:
    prompts = _prompts(model, 8)
    solo = []
    for prompt in prompts:
        alone = Recorder("solo")
        model.submit(prompt, _greedy(24), alone.cancelled, alone)
        solo.append(alone.tokens())
    steps_before = model.batching.steps
    together = [Recorder(f"s{i}") for i in range(8)]
    for prompt, recorder in zip(prompts, together, strict=True):
        model.submit(prompt, _greedy(24), recorder.cancelled, recorder)
    batched = [r.tokens() for r in together]
    assert batched == solo
    assert [r.finish.completion_tokens for r in together] == [len(t) for t in solo]
    steps = model.batching.steps - steps_before
    # one after another they take a forward pass per prompt chunk and token (8 x 24 and more);
    # together a few dozen (the submissions land within the first steps)
    assert steps < 2 * (24 + 8), steps
    assert model.batching.largest_batch >= 6


def test_a_cancel_takes_effect_at_the_next_step_and_the_others_go_on(model: TorchModel) -> None:
    prompts = _prompts(model, 4)
    quitter = Recorder("quitter", cancel_after=5)
    others = [Recorder(f"o{i}") for i in range(3)]
    model.submit(prompts[0], _greedy(40), quitter.cancelled, quitter)
    for prompt, recorder in zip(prompts[1:], others, strict=True):
        model.submit(prompt, _greedy(40), recorder.cancelled, recorder)
    assert (quitter.finish.reason, quitter.finish.completion_tokens) == ("cancelled", 5)
    assert len(quitter.steps) == 5
    for recorder in others:
        assert recorder.finish.reason in ("length", "stop")
        assert recorder.finish.completion_tokens > 5 or recorder.finish.reason == "stop"


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_the_others_decode(
    model: TorchModel,
) -> None:
    log: list[tuple[str, object]] = []
    short = Recorder("short", log)
    model.submit(_prompts(model, 1)[0], _greedy(200), short.cancelled, short)
    while len(short.steps) < 3:  # decoding has begun
        short.done.wait(0.01)
    long_prompt = (model.encode("The capital of France is Paris. ") * 40)[:320]
    long = Recorder("long", log)
    model.submit(long_prompt, _greedy(4), long.cancelled, long)
    long.tokens()
    short.cancelled.set()
    short.finish  # noqa: B018 - waits for the end
    joined = log.index(("long", STARTED))
    first_long_token = next(i for i, (who, item) in enumerate(log)
                            if who == "long" and isinstance(item, Step))
    short_tokens_meanwhile = sum(1 for who, item in log[joined:first_long_token]
                                 if who == "short" and isinstance(item, Step))
    chunks = -(-len(long_prompt) // 16)
    # one short token per step: the 320-token prompt took 20 steps of 16 tokens, not one stall
    assert short_tokens_meanwhile >= chunks - 1


def test_beyond_max_batch_sequences_wait_for_a_place(tiny: TinyModel) -> None:
    model = _load(tiny, max_batch=2)
    try:
        recorders = [Recorder(f"r{i}") for i in range(5)]
        for prompt, recorder in zip(_prompts(model, 5), recorders, strict=True):
            model.submit(prompt, _greedy(8), recorder.cancelled, recorder)
        assert all(r.finish.completion_tokens <= 8 for r in recorders)
        assert model.batching.largest_batch == 2
        assert model.batching.sequences == 5
    finally:
        model.close()


def test_closing_the_model_ends_waiting_and_running_sequences(tiny: TinyModel) -> None:
    model = _load(tiny, max_batch=1)
    first, second = Recorder("first"), Recorder("second")
    prompts = _prompts(model, 2)
    model.submit(prompts[0], _greedy(500), first.cancelled, first)
    model.submit(prompts[1], _greedy(500), second.cancelled, second)
    model.close()
    for recorder in (first, second):
        assert recorder.done.wait(30)
        last = recorder.items[-1]
        assert isinstance(last, Finish | BaseException)


def test_kv_caches_grow_past_their_first_allocation(tmp_path: Path) -> None:
    tiny = build_tiny_llama(tmp_path, context_length=1024)
    model = _load(tiny)
    try:
        recorder = Recorder("long-answer")
        model.submit(model.encode("Paris"), _greedy(400), recorder.cancelled, recorder)
        assert recorder.finish.completion_tokens in range(1, 401)
        solo = list(model.generate(model.encode("Paris"), _greedy(400), threading.Event()))
        assert [s.token_id for s in solo if isinstance(s, Step)] == recorder.tokens()
    finally:
        model.close()


def test_short_prompts_arriving_together_are_prefilled_in_the_same_step(tiny: TinyModel) -> None:
    model = _load(tiny, prefill_chunk_tokens=512)
    try:
        prompts = [model.encode("The cat sat") for _ in range(6)]
        recorders = [Recorder(f"r{i}") for i in range(6)]
        for prompt, recorder in zip(prompts, recorders, strict=True):
            model.submit(prompt, _greedy(4), recorder.cancelled, recorder)
        assert all(r.finish for r in recorders)
        # six 3-token prompts fit one chunk: they joined together, so about 4 steps in all,
        # not one prefill step each before decoding
        assert model.batching.steps <= 4 + 6 // 2, model.batching.steps
    finally:
        model.close()


def test_quantised_weights_report_their_size_and_kind(tiny: TinyModel) -> None:
    dense = TorchEngine(dtype="float32").load(tiny.safetensors_files(), _ignore)
    int8 = TorchEngine(quantize="int8").load(tiny.safetensors_files(), _ignore)
    int4 = TorchEngine(quantize="int4").load(tiny.safetensors_files(), _ignore)
    fp16 = TorchEngine(quantize="fp16").load(tiny.safetensors_files(), _ignore)
    try:
        assert int8.info.dtype == "int8 (float32 activations)"
        assert int4.info.dtype == "int4 (float32 activations)"
        assert fp16.info.dtype == "fp16 (float32 activations)"
        # (int4: the kernel's copy plus the packed nibbles of the float32 path, about int8's
        # size; this tiny model's odd-sized LM head stays float32 with int4)
        assert int8.info.memory_bytes < int4.info.memory_bytes < dense.info.memory_bytes
        assert int8.info.memory_bytes < fp16.info.memory_bytes < dense.info.memory_bytes
    finally:
        dense.close()
        int8.close()
        int4.close()
        fp16.close()


def test_auto_keeps_float16_weights_on_a_cpu_without_fast_bfloat16() -> None:
    engine = TorchEngine(quantize="auto")
    if cpu_has_fast_bf16():
        assert engine.weights is None  # bfloat16 matrix units: weights as dtype
    elif fbgemm_fp16_available():
        assert engine.weights == "fp16"
    else:
        assert engine.weights == "int8"
    assert TorchEngine(quantize="none").weights is None


def test_a_float16_layer_computes_each_row_alike_in_any_number_of_rows() -> None:
    """fbgemm gives blocks of one or two rows other kernels, whatever the call's size (7 rows:
    five, then two); `Fp16Linear` pads such calls, so a row's numbers never depend on how many
    rows share its call."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True)
    layer = Fp16Linear(linear)
    x = torch.randn(45, 64)
    together = layer(x)
    for rows in (1, 2, 3, 5, 7, 14, 17, 31, 32):
        for start in (0, 11):
            assert torch.equal(layer(x[start:start + rows].clone()), together[start:start + rows])
    reference = torch.nn.functional.linear(x, linear.weight.half().float(), linear.bias)
    assert torch.allclose(together, reference, atol=1e-4, rtol=1e-4)
    assert layer(x[0]).shape == (96,)  # one vector in, one vector out


@pytest.mark.parametrize("threads", [1, 2])
def test_fp16_rows_pads_exactly_the_counts_whose_rows_fbgemm_sums_differently(
        threads: int) -> None:
    if not fbgemm_fp16_available():
        pytest.skip("this torch build has no fbgemm")
    torch.manual_seed(0)
    packed = torch.ops.quantized.linear_prepack_fp16(torch.randn(32, 64), None)
    x = torch.randn(245, 64)  # 245 rows: blocks of 120, 120 and 5, none of one or two
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = torch.ops.quantized.linear_dynamic_fp16(x, packed)
        for rows in range(1, 246):
            alike = torch.equal(torch.ops.quantized.linear_dynamic_fp16(x[:rows].clone(), packed),
                                together[:rows])
            assert alike == (fp16_rows(rows) == rows), rows
            assert fp16_rows(rows) - rows <= 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bits", [8, 4])
def test_both_kernels_of_a_quantised_layer_compute_the_same_weight(bits: int) -> None:
    torch.manual_seed(0)
    model_rows = RowPlan()
    linear = torch.nn.Linear(64, 96, bias=True)
    layer = Int8Linear(linear, model_rows) if bits == 8 else Int4Linear(linear, model_rows)
    x = torch.randn(40, 64)
    model_rows.set([40])  # one entry of 40 rows: the dequantised float32 path
    dense = layer(x)
    model_rows.set([1] * 40)  # forty entries of one row: the weight-only kernel
    small = layer(x)
    assert torch.allclose(dense, small, atol=0.05, rtol=0.02)
    error = (dense - linear(x)).abs().max() / linear(x).abs().max()
    assert error < (0.02 if bits == 8 else 0.15), error


def test_a_failing_listener_cancels_only_its_own_sequence(model: TorchModel) -> None:
    prompts = _prompts(model, 3)
    seen: list[object] = []
    broken_done = threading.Event()

    def broken(item: object) -> None:
        seen.append(item)
        if isinstance(item, Finish | BaseException):
            broken_done.set()
        if isinstance(item, Step):
            raise RuntimeError("the listener's event loop is gone")

    model.submit(prompts[0], _greedy(30), threading.Event(), broken)
    others = [Recorder(f"o{i}") for i in range(2)]
    for prompt, recorder in zip(prompts[1:], others, strict=True):
        model.submit(prompt, _greedy(30), recorder.cancelled, recorder)
    assert broken_done.wait(30)
    last = seen[-1]
    assert isinstance(last, Finish) and last.reason == "cancelled"
    assert sum(isinstance(i, Step) for i in seen) == 1
    for recorder in others:
        assert recorder.finish.reason in ("length", "stop")
