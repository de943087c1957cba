"""The ctransformers engine end to end on a tiny SentencePiece GGUF: load, render, encode,
streaming generation, cancellation, stopping; the preflight that refuses BPE vocabularies; and
crash isolation (the library segfaulting in its worker process never takes the test down)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import gguf
import pytest

from neuron.devices import cpu_flags
from neuron.engines import ctransformers_worker as proto
from neuron.engines.base import Finish, GenerationParams, ModelFiles, Step
from neuron.engines.ctransformers_engine import (
    CTransformersEngine,
    CTransformersModel,
    WorkerDiedError,
    WorkerProcess,
    check_ctransformers_supported,
    describe_exit,
    detect_lib,
    gguf_vocabulary,
)
from neuron.errors import (
    ModelLoadError,
    ModelNotLoadedError,
    NeuronError,
    UnsupportedArchitectureError,
)
from tests.support.tiny_models import TinyModel, build_tiny_llama
from tests.support.tiny_sentencepiece import (
    BYTE_OFFSET,
    GPT2_EOS,
    TinySentencePiece,
    build_tiny_gpt2_ggml,
    build_tiny_sentencepiece,
)

if importlib.util.find_spec("ctransformers") is None:
    pytest.skip("ctransformers is not installed", allow_module_level=True)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
P = GenerationParams
GREEDY = P(max_tokens=24, temperature=0.0)
#: Long enough that the worker is still generating when a test cancels or kills it.
LONG = P(max_tokens=3000, temperature=0.8, seed=1)


def _ignore(fraction: float, what: str) -> None:
    pass


def run(
    model: CTransformersModel,
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


def reference_text(spm: TinySentencePiece, ids: list[int]) -> str:
    """What the ids decode to, computed from the vocabulary alone (SentencePiece rules)."""
    data = b""
    for token_id in ids:
        token = spm.tokens[token_id]
        if token.startswith("<0x") and len(token) == 6:
            data += bytes([int(token[3:5], 16)])
        elif not token.startswith("<"):
            data += token.replace("▁", " ").encode()
    text = data.decode("utf-8", errors="replace")
    return text[1:] if text.startswith(" ") else text


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> TinySentencePiece:
    return build_tiny_sentencepiece(tmp_path_factory.mktemp("tiny-spm"), seed=3)


@pytest.fixture(scope="module")
def engine() -> CTransformersEngine:
    return CTransformersEngine(threads=1)


@pytest.fixture(scope="module")
def model(engine: CTransformersEngine, spm: TinySentencePiece) -> Iterator[CTransformersModel]:
    loaded = engine.load(spm.files(), _ignore)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def prompt(model: CTransformersModel) -> list[int]:
    return model.encode(model.render_chat(QUESTION))


@pytest.fixture(scope="module")
def greedy_ids(model: CTransformersModel, prompt: list[int]) -> list[int]:
    steps, _ = run(model, prompt, GREEDY)
    return [s.token_id for s in steps]


# --------------------------------------------------------------------------- load


def test_info_comes_from_the_gguf(model: CTransformersModel, spm: TinySentencePiece) -> None:
    info = model.info
    assert info.engine == "ctransformers"
    assert info.format == "gguf"
    assert info.architecture == "llama"
    assert info.context_length == spm.context_length
    assert info.vocab_size == spm.vocab_size
    assert 100_000 < info.parameters < 200_000
    assert info.memory_bytes == spm.gguf_path.stat().st_size
    assert info.device == "cpu"
    assert info.dtype == "F32"


def test_load_reports_progress(engine: CTransformersEngine, spm: TinySentencePiece) -> None:
    seen: list[float] = []
    loaded = engine.load(spm.files(), lambda fraction, what: seen.append(fraction))
    loaded.close()
    assert seen[0] == 0.0
    assert seen[-1] == 1.0
    assert seen == sorted(seen)


def test_quantised_file_with_capped_context_and_chatml_fallback(tmp_path: Path) -> None:
    spm = build_tiny_sentencepiece(tmp_path, tensor_type="Q8_0", chat_template=None)
    loaded = CTransformersEngine(threads=1, context_length=48).load(spm.files(), _ignore)
    try:
        assert loaded.info.dtype == "Q8_0"
        assert loaded.info.context_length == 48
        assert loaded.chat_template.origin == "chatml"
        text = loaded.render_chat(QUESTION)
        assert text == (
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        )
        ids = loaded.encode("Hello world")
        steps, finish = run(loaded, ids, P(max_tokens=1000, temperature=0.0))
        assert finish.reason == "length"
        assert len(steps) == finish.completion_tokens == 48 - len(ids)  # clamped to the context
        steps, finish = run(loaded, [spm.bos_id] * 60, GREEDY)
        assert (steps, finish.reason, finish.completion_tokens) == ([], "length", 0)
    finally:
        loaded.close()


# --------------------------------------------------------------------------- prompt


def test_render_chat_uses_the_gguf_template(model: CTransformersModel) -> None:
    assert model.chat_template.origin == "gguf"
    assert model.render_chat(QUESTION) == "<s>[INST] What is the capital of France? [/INST]"


def test_encode_splits_control_tokens_and_falls_back_to_bytes(
    model: CTransformersModel, spm: TinySentencePiece, prompt: list[int]
) -> None:
    tokens = spm.tokens
    assert prompt[0] == spm.bos_id  # "<s>" in the text is the control token, not characters
    assert prompt[1] == tokens.index("▁[INST]")
    assert prompt[-1] == tokens.index("▁[/INST]")
    assert model.encode("Hello world") == [tokens.index("▁Hello"), tokens.index("▁world")]
    # "日" is not in the vocabulary: a word-start piece, then its three UTF-8 bytes.
    assert model.encode("日") == [tokens.index("▁")] + [BYTE_OFFSET + b for b in "日".encode()]
    # ctransformers' own Python tokenize sizes its buffer by characters and overflows the heap
    # here (3 byte tokens per character); the worker sizes it by bytes.
    long_text = "日本語" * 200
    assert len(model.encode(long_text)) == 1 + 3 * len(long_text)
    assert model.encode("") == []
    assert model.encode("</s>") == [spm.eos_id]


def test_encode_answers_while_a_generation_runs(
    model: CTransformersModel, prompt: list[int]
) -> None:
    cancelled = threading.Event()
    stream = model.generate(prompt, LONG, cancelled)
    assert isinstance(next(stream), Step)
    results: list[list[int]] = []
    worker = threading.Thread(target=lambda: results.append(model.encode("Hello world")))
    started = time.perf_counter()
    worker.start()
    worker.join(timeout=5)
    assert results and len(results[0]) == 2
    assert time.perf_counter() - started < 1.0
    cancelled.set()
    assert next(item for item in stream if isinstance(item, Finish)).reason == "cancelled"


# --------------------------------------------------------------------------- generation


def test_greedy_generation_streams_and_is_deterministic(
    model: CTransformersModel, prompt: list[int], greedy_ids: list[int], spm: TinySentencePiece
) -> None:
    steps, finish = run(model, prompt, GREEDY)
    assert [s.token_id for s in steps] == greedy_ids
    assert len(steps) == finish.completion_tokens == GREEDY.max_tokens
    assert finish.reason == "length"
    assert finish.stop_sequence is None
    assert finish.prefill_seconds >= 0 and finish.decode_seconds >= 0
    assert all(0 <= i < spm.vocab_size and i != spm.eos_id for i in greedy_ids)
    # The streamed pieces add up to the decoded text, byte tokens assembled UTF-8 safely.
    assert text_of(steps, finish) == reference_text(spm, greedy_ids)


def test_max_tokens_is_respected(model: CTransformersModel, prompt: list[int]) -> None:
    steps, finish = run(model, prompt, P(max_tokens=5, temperature=0.0))
    assert len(steps) == finish.completion_tokens == 5
    assert finish.reason == "length"


def test_seeded_sampling_is_reproducible(
    model: CTransformersModel, prompt: list[int], greedy_ids: list[int]
) -> None:
    sampled = P(max_tokens=24, temperature=1.5, seed=7)
    first = [s.token_id for s in run(model, prompt, sampled)[0]]
    again = [s.token_id for s in run(model, prompt, sampled)[0]]
    other = [s.token_id for s in run(model, prompt, P(max_tokens=24, temperature=1.5, seed=8))[0]]
    assert first == again
    assert first != other
    assert first != greedy_ids
    # top_k=1 leaves a single candidate: greedy whatever the temperature.
    top1 = [s.token_id for s in run(model, prompt, P(max_tokens=24, temperature=1.5, top_k=1))[0]]
    assert top1 == greedy_ids


def test_penalties_change_the_output(
    model: CTransformersModel, prompt: list[int], greedy_ids: list[int]
) -> None:
    for params in (
        P(max_tokens=24, temperature=0.0, repetition_penalty=5.0),
        P(max_tokens=24, temperature=0.0, frequency_penalty=50.0),
    ):
        ids = [s.token_id for s in run(model, prompt, params)[0]]
        assert len(ids) == 24
        assert len(set(ids)) == 24  # a strong penalty forbids any repeat
    assert len(set(greedy_ids)) < 24  # ...which the unpenalised model does


def test_cancel_mid_generation_finishes_promptly(
    model: CTransformersModel, prompt: list[int], greedy_ids: list[int]
) -> None:
    cancelled = threading.Event()
    steps: list[Step] = []
    started = time.perf_counter()
    items = list(_cancel_after(model.generate(prompt, LONG, cancelled), cancelled, 3, steps))
    elapsed = time.perf_counter() - started
    finish = items[-1]
    assert isinstance(finish, Finish)
    assert finish.reason == "cancelled"
    assert finish.completion_tokens == len(steps) == 3
    assert elapsed < 1.0
    # The worker stopped that generation and serves the next one normally.
    assert [s.token_id for s in run(model, prompt, GREEDY)[0]] == greedy_ids


def _cancel_after(
    stream: Iterator[Step | Finish], cancelled: threading.Event, count: int, steps: list[Step]
) -> Iterator[Step | Finish]:
    for item in stream:
        if isinstance(item, Step):
            steps.append(item)
            if len(steps) == count:
                cancelled.set()
        yield item


def test_cancelled_before_start(model: CTransformersModel, prompt: list[int]) -> None:
    cancelled = threading.Event()
    cancelled.set()
    steps, finish = run(model, prompt, LONG, cancelled)
    assert steps == []
    assert (finish.reason, finish.completion_tokens) == ("cancelled", 0)


def test_abandoned_stream_stops_the_worker(
    model: CTransformersModel, prompt: list[int], greedy_ids: list[int]
) -> None:
    stream = model.generate(prompt, LONG, threading.Event())
    assert isinstance(stream, Generator)
    next(stream)
    stream.close()  # e.g. the consumer failed: the worker is told to stop
    assert [s.token_id for s in run(model, prompt, GREEDY)[0]] == greedy_ids


def test_stop_string_cuts_the_output(
    model: CTransformersModel, prompt: list[int], greedy_ids: list[int], spm: TinySentencePiece
) -> None:
    full = reference_text(spm, greedy_ids)
    stop = next(
        full[i : i + 3]
        for i in range(4, len(full) - 3)
        if full[i : i + 3].isascii() and full[i : i + 3].isalpha()
    )
    steps, finish = run(model, prompt, P(max_tokens=24, temperature=0.0, stop=("zzz", stop)))
    assert finish.reason == "stop"
    assert finish.stop_sequence == stop
    assert text_of(steps, finish) == full[: full.index(stop)]
    assert finish.completion_tokens == len(steps) < 24


def test_eos_token_stops_and_is_never_emitted(
    tmp_path: Path, spm: TinySentencePiece, greedy_ids: list[int]
) -> None:
    # Same weights, but the token greedy decoding produces fourth is declared the EOS token.
    eos = greedy_ids[3]
    variant = build_tiny_sentencepiece(tmp_path, seed=3, eos_id=eos)
    loaded = CTransformersEngine(threads=1).load(variant.files(), _ignore)
    try:
        assert eos in loaded.stop_ids
        ids = loaded.encode(loaded.render_chat(QUESTION))
        steps, finish = run(loaded, ids, GREEDY)
        assert [s.token_id for s in steps] == greedy_ids[: greedy_ids.index(eos)]
        assert finish.reason == "stop"
        assert finish.stop_sequence is None
    finally:
        loaded.close()


def test_invalid_prompts_are_refused(model: CTransformersModel, spm: TinySentencePiece) -> None:
    with pytest.raises(ValueError, match="empty"):
        model.generate([], GREEDY, threading.Event())
    with pytest.raises(ValueError, match="prompt ids"):
        model.generate([spm.vocab_size], GREEDY, threading.Event())
    with pytest.raises(ValueError, match="prompt ids"):
        model.generate([-1], GREEDY, threading.Event())


def test_legacy_gpt2_ggml_file(tmp_path: Path) -> None:
    gpt2 = build_tiny_gpt2_ggml(tmp_path)
    engine = CTransformersEngine(threads=1)
    loaded = engine.load(gpt2.files(), _ignore)  # architecture from the file name
    try:
        info = loaded.info
        assert (info.architecture, info.context_length, info.vocab_size) == ("gpt2", 128, 480)
        assert gpt2.eos_id in loaded.stop_ids  # the library's <|endoftext|>
        assert loaded.chat_template.origin == "chatml"
        assert "<|im_start|>user" in loaded.render_chat(QUESTION)
        ids = loaded.encode(" the capital of France" + GPT2_EOS)  # EOS text is the EOS token
        assert [gpt2.vocab[i] for i in ids[:-1]] == [b" the", b" capital", b" of", b" France"]
        assert ids[-1] == gpt2.eos_id
        steps, finish = run(loaded, ids, GREEDY)
        again, _ = run(loaded, ids, GREEDY)
        assert [s.token_id for s in steps] == [s.token_id for s in again]
        assert len(steps) == finish.completion_tokens == GREEDY.max_tokens
        expected = b"".join(gpt2.vocab[s.token_id] for s in steps).decode(errors="replace")
        assert text_of(steps, finish) == expected  # no SentencePiece space handling here
    finally:
        loaded.close()
    # Without a telling name, config.json's model_type names the architecture.
    anonymous = gpt2.path.rename(tmp_path / "model.bin")
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "gpt2"}', encoding="utf-8")
    files = ModelFiles(model_id="x", format="gguf", weights=(anonymous,), config=config)
    engine.load(files, _ignore).close()
    with pytest.raises(UnsupportedArchitectureError, match=r"config\.json"):
        engine.load(ModelFiles(model_id="x", format="gguf", weights=(anonymous,)), _ignore)


# --------------------------------------------------------------------------- preflight


def test_bpe_vocabulary_is_refused_without_starting_a_worker(
    tiny_model: TinyModel, engine: CTransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_worker(*args: object, **kwargs: object) -> WorkerProcess:
        raise AssertionError("preflight must refuse before a worker starts")

    monkeypatch.setattr("neuron.engines.ctransformers_engine.WorkerProcess", no_worker)
    assert gguf_vocabulary(tiny_model.gguf_path) == "gpt2"
    with pytest.raises(UnsupportedArchitectureError, match="torch engine") as caught:
        engine.load(tiny_model.gguf_files(), _ignore)
    assert caught.value.engine == "ctransformers"
    assert "BPE" in str(caught.value)
    assert isinstance(caught.value, ModelLoadError)


def test_safetensors_are_refused(tiny_model: TinyModel, engine: CTransformersEngine) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="torch engine"):
        engine.load(tiny_model.safetensors_files(), _ignore)


def _metadata_only_gguf(path: Path, architecture: str, vocabulary: str, *, scores: bool) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(vocabulary)
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    if scores:
        writer.add_token_scores([0.0] * 4)
    writer.add_token_types([2, 3, 3, 1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_preflight_refusals(tmp_path: Path) -> None:
    qwen = _metadata_only_gguf(tmp_path / "q.gguf", "qwen2", "gpt2", scores=True)
    with pytest.raises(UnsupportedArchitectureError, match=r"'qwen2'.*torch engine"):
        check_ctransformers_supported(qwen)
    no_scores = _metadata_only_gguf(tmp_path / "s.gguf", "llama", "llama", scores=False)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.ggml\.scores"):
        check_ctransformers_supported(no_scores)
    no_head = _metadata_only_gguf(tmp_path / "h.gguf", "llama", "llama", scores=True)
    with pytest.raises(UnsupportedArchitectureError, match=r"token_embd\.weight"):
        check_ctransformers_supported(no_head)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="neither a GGUF nor a GGML"):
        check_ctransformers_supported(junk)


def test_legacy_ggml_files_need_a_known_architecture(tmp_path: Path) -> None:
    legacy = tmp_path / "ggml-model-q4_0.bin"
    legacy.write_bytes(b"lmgg" + bytes(60))  # the little-endian 'ggml' magic
    assert check_ctransformers_supported(legacy, model_type="gpt_neox").model_type == "gpt_neox"
    assert check_ctransformers_supported(legacy, model_type="gpt_bigcode").model_type == (
        "starcoder"
    )
    with pytest.raises(UnsupportedArchitectureError, match="legacy GGML"):
        check_ctransformers_supported(legacy)
    with pytest.raises(UnsupportedArchitectureError, match="'bloom'"):
        check_ctransformers_supported(legacy, model_type="bloom")
    named = tmp_path / "starcoder-ggml-q8_0.bin"
    named.write_bytes(b"lmgg" + bytes(60))
    facts = check_ctransformers_supported(named)
    assert (facts.container, facts.model_type, facts.dtype) == ("ggml", "starcoder", "ggml")


# --------------------------------------------------------------------------- isolation


def test_a_library_crash_while_loading_is_contained(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    engine: CTransformersEngine,
    spm: TinySentencePiece,
) -> None:
    # A BPE GGUF with the scores old llama.cpp wants loads far enough to segfault in its
    # tokenizer ("byte not found in vocab"): exactly what preflight refuses. Bypassing the
    # preflight here shows the worker contains it.
    add_token_list = gguf.GGUFWriter.add_token_list

    def with_scores(self: gguf.GGUFWriter, tokens: list[str]) -> None:
        add_token_list(self, tokens)
        self.add_token_scores([0.0] * len(tokens))

    monkeypatch.setattr(gguf.GGUFWriter, "add_token_list", with_scores)
    bpe = build_tiny_llama(tmp_path).gguf_path
    request = proto.Load(
        path=str(bpe),
        model_type="gguf",
        lib=engine.lib,
        context_length=256,
        threads=1,
        batch_size=64,
    )
    with pytest.raises(ModelLoadError, match=r"died while loading .*\(signal 11, SIGSEGV\)"):
        WorkerProcess(request, model_id="crash")
    # The engine loads the next model as if nothing happened.
    loaded = engine.load(spm.files(), _ignore)
    try:
        assert run(loaded, loaded.encode("Hello"), P(max_tokens=3, temperature=0.0))[1].reason
    finally:
        loaded.close()


@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGKILL])
def test_a_worker_crash_mid_generation_fails_only_that_request(
    engine: CTransformersEngine, spm: TinySentencePiece, greedy_ids: list[int], signum: int
) -> None:
    loaded = engine.load(spm.files(), _ignore)
    try:
        prompt = loaded.encode(loaded.render_chat(QUESTION))
        pid = loaded.worker_pid
        stream = loaded.generate(prompt, LONG, threading.Event())
        assert isinstance(next(stream), Step)
        os.kill(pid, signum)
        with pytest.raises(WorkerDiedError) as caught:
            for _ in stream:
                pass
        name = signal.Signals(signum).name
        assert f"died (signal {signum}, {name})" in str(caught.value)
        assert isinstance(caught.value, NeuronError)
        assert caught.value.returncode == -signum
        # The next request restarts the worker and the model answers as before.
        assert [s.token_id for s in run(loaded, prompt, GREEDY)[0]] == greedy_ids
        assert loaded.restarts == 1
        assert loaded.worker_pid != pid
    finally:
        loaded.close()


def test_a_dead_worker_is_restarted_for_encode_too(
    engine: CTransformersEngine, spm: TinySentencePiece
) -> None:
    loaded = engine.load(spm.files(), _ignore)
    try:
        expected = loaded.encode("Hello world")
        os.kill(loaded.worker_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while loaded.worker_alive:  # until the model notices
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert loaded.encode("Hello world") == expected
        assert loaded.restarts == 1
    finally:
        loaded.close()


def test_close_during_a_generation_stops_it(
    engine: CTransformersEngine, spm: TinySentencePiece
) -> None:
    loaded = engine.load(spm.files(), _ignore)
    stream = loaded.generate(loaded.encode("Hello"), LONG, threading.Event())
    assert isinstance(next(stream), Step)
    started = time.perf_counter()
    loaded.close()  # e.g. an unload from another thread
    assert time.perf_counter() - started < 2.0  # the worker stops mid-generation...
    *_, finish = stream
    assert isinstance(finish, Finish)
    assert finish.reason == "cancelled"  # ...and the stream ends cleanly


def test_the_worker_exits_when_the_neuron_dies(spm: TinySentencePiece) -> None:
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from neuron.engines.base import ModelFiles\n"
        "from neuron.engines.ctransformers_engine import CTransformersEngine\n"
        "files = ModelFiles(model_id='m', format='gguf', weights=(Path(sys.argv[1]),))\n"
        "model = CTransformersEngine(threads=1).load(files, lambda f, w: None)\n"
        "print(model.worker_pid, flush=True)\n"
        "os._exit(0)  # no close, no finalizers: as if killed\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(spm.gguf_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    pid = int(result.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while _running(pid):
        assert time.monotonic() < deadline, "the orphaned worker kept running"
        time.sleep(0.02)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an unreaped zombie counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_close_stops_the_worker(engine: CTransformersEngine, spm: TinySentencePiece) -> None:
    loaded = engine.load(spm.files(), _ignore)
    pid = loaded.worker_pid
    loaded.close()
    loaded.close()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ModelNotLoadedError):
        loaded.generate([1, 2], GREEDY, threading.Event())
    with pytest.raises(ModelNotLoadedError):
        loaded.encode("Hello")


# --------------------------------------------------------------------------- helpers


def test_helpers() -> None:
    assert detect_lib() in ("avx2", "avx", "basic")
    assert (detect_lib() == "avx2") == ("avx2" in cpu_flags())  # one reading of /proc/cpuinfo
    assert describe_exit(-11) == "signal 11, SIGSEGV"
    assert describe_exit(1) == "exit status 1"
    with pytest.raises(ValueError, match="batch_size"):
        CTransformersEngine(batch_size=1024)
    with pytest.raises(ValueError, match="threads"):
        CTransformersEngine(threads=0)
