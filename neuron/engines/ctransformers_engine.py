"""The ctransformers engine: GGUF / GGML models run by ctransformers 0.2.27, isolated in a child
process.

ctransformers (unmaintained since 2023) wraps an old llama.cpp (GGUF: llama, with a SentencePiece
vocabulary) and the ggml example models (legacy GGML files: gpt2, gptj, gpt_neox, falcon, mpt,
starcoder, replit, dolly, llama). Two facts shape this module:

* **Preflight.** It segfaults while loading GGUFs with a byte-level BPE vocabulary
  (``tokenizer.ggml.model = gpt2``: Qwen, Llama 3, SmolLM2; its old BPE tokenizer fails on the
  newline token), and its loaders trust the file. `check_ctransformers_supported` reads the
  file's header and metadata with `gguf.GGUFReader` (no weights) and refuses, before any process
  starts: BPE vocabularies and architectures it has no graph for with
  `UnsupportedArchitectureError` naming the torch engine (a 422 ``unsupported_architecture``),
  missing metadata with `ModelLoadError`.
* **Isolation.** The library runs in a worker process per model
  (`neuron.engines.ctransformers_worker`, started as ``python -P ctransformers_worker.py``,
  speaking length-prefixed msgpack over its stdin/stdout). A crash inside it fails the running
  request with `WorkerDiedError` ("the ctransformers worker process for 'm' died (signal 11,
  SIGSEGV) ..."), never the neuron; a crash while loading is a `ModelLoadError`. The model is
  not left broken: its next request (`encode` or `generate`) starts a fresh worker and loads the
  file again (``restarts`` counts them; a restart that fails raises `ModelLoadError`). `close`
  stops the worker; a generation running meanwhile ends with ``Finish(reason="cancelled")``. If
  the neuron dies, the worker sees its input close and exits.

Text handling stays on the neuron's side and matches the torch engine: the chat template comes
from ``chat_template.jinja``, ``tokenizer_config.json`` or the GGUF metadata (else ChatML); the
prompt is split on the vocabulary's control tokens (old llama.cpp never produces them from text)
and the pieces are tokenised by the library; generated tokens come back one by one with their
bytes and go through the same `IncrementalDetokenizer` and `StopMatcher` as the torch engine.
Sampling uses the library's sampler (top-k, top-p, temperature, repetition penalty over the last
``repetition_window`` generated tokens) with a fresh seed per step from our own seeded generator;
presence and frequency penalties are applied to the logits in place. One generation runs at a
time per model (the library has no batching); the worker keeps its KV cache and reuses the longest
common prompt prefix across requests.

Legacy GGML files arrive as ``ModelFiles(format="gguf")`` like GGUF ones (the magic tells them
apart); their architecture comes from config.json's ``model_type``, else the file name
(``...starcoder...``), else the magic (``ggjt``/``ggmf`` are llama, ``ggcc`` falcon).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Literal, Protocol

from neuron.devices import cpu_flags
from neuron.engines import ctransformers_worker as proto
from neuron.engines.base import (
    Finish,
    FinishReason,
    GenerationParams,
    ModelFiles,
    ModelInfo,
    ProgressCallback,
    Step,
)
from neuron.errors import (
    ChatTemplateError,
    ModelLoadError,
    ModelNotLoadedError,
    NeuronError,
    UnsupportedArchitectureError,
)
from neuron.text.chat_template import ChatTemplate, TemplateMessage, TemplateValue
from neuron.text.detokenize import IncrementalDetokenizer, StopMatcher
from neuron.text.tokenizer import CHATML_STOP_TOKENS, GGUFMetadata, gguf_value

logger = logging.getLogger(__name__)

ENGINE: Final = "ctransformers"
WORKER_SCRIPT: Final = Path(proto.__file__)

#: GGUF architectures the llama.cpp inside ctransformers 0.2.27 has a graph for.
GGUF_ARCHITECTURES: Final = frozenset({"llama", "falcon"})
#: The only GGUF vocabulary it handles (SentencePiece); ``gpt2`` (BPE) crashes it.
SUPPORTED_VOCABULARY: Final = "llama"
#: Legacy GGML model types (as transformers' ``model_type`` names them) → ctransformers' names.
LEGACY_MODEL_TYPES: Final = {
    "gpt2": "gpt2",
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
    "falcon": "falcon",
    "mpt": "mpt",
    "starcoder": "starcoder",
    "gpt_bigcode": "starcoder",
    "replit": "replit",
    "dolly-v2": "dolly-v2",
    "llama": "llama",
}
#: File-name hints for legacy GGML files without a config.json, first match wins.
_LEGACY_NAME_HINTS: Final = (
    ("starcoder", "starcoder"),
    ("santacoder", "starcoder"),
    ("replit", "replit"),
    ("dolly", "dolly-v2"),
    ("falcon", "falcon"),
    ("mpt", "mpt"),
    ("neox", "gpt_neox"),
    ("pythia", "gpt_neox"),
    ("redpajama", "gpt_neox"),
    ("gpt-j", "gptj"),
    ("gptj", "gptj"),
    ("gpt2", "gpt2"),
    ("gpt-2", "gpt2"),
    ("llama", "llama"),
)
#: Tensor types (ggml type ids) the ggml inside ctransformers knows: F32, F16, Q4_0, Q4_1,
#: Q5_0, Q5_1, Q8_0, Q8_1 and the k-quants Q2_K..Q8_K.
_GGML_TYPES: Final = frozenset({0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})
_GGUF_MAGIC: Final = b"GGUF"
#: Legacy magics as stored (little-endian ``ggml``, ``ggmf``, ``ggjt``, and ggllm's ``ggcc``).
_LEGACY_MAGICS: Final = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt", b"ccgg": "ggcc"}
# GGUF token types (gguf.TokenType): control and user-defined tokens are split out of the text.
_TOKEN_TYPE_CONTROL: Final = 3
_TOKEN_TYPE_USER_DEFINED: Final = 4
_SPECIAL_TOKEN_KEYS: Final = (
    ("bos_token", "bos_token_id"),
    ("eos_token", "eos_token_id"),
    ("unk_token", "unknown_token_id"),
    ("pad_token", "padding_token_id"),
)
# llama.cpp sizes its compute buffers for 512-token batches.
_MAX_BATCH: Final = 512
#: What a legacy model's BOS/EOS text must look like to count as a special token.
_SPECIAL_TEXT: Final = re.compile(r"<[^\s<>]+>")
_POLL_SECONDS: Final = 0.02
_TOKENIZE_TIMEOUT: Final = 120.0
_CLOSE_TIMEOUT: Final = 5.0


class CTransformersError(NeuronError):
    """ctransformers failed a request (its own error, reported by the worker process)."""


class WorkerDiedError(CTransformersError):
    """The worker process running ctransformers died (a crash inside the library, or killed)."""

    def __init__(self, message: str, *, returncode: int | None) -> None:
        self.returncode = returncode
        super().__init__(message)


def describe_exit(returncode: int | None) -> str:
    """``signal 11, SIGSEGV`` or ``exit status 1`` for a process's return code."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
        return f"signal {-returncode}, {name}"
    return f"exit status {returncode}"


def detect_lib() -> str:
    """The ctransformers build this CPU runs (``avx2``, ``avx`` or ``basic``), from
    ``/proc/cpuinfo`` (ctransformers' own probe takes about a second per load)."""
    flags = cpu_flags()
    if "avx2" in flags:
        return "avx2"
    if "avx" in flags and "f16c" in flags:
        return "avx"
    return "basic"


# --------------------------------------------------------------------------- preflight


@dataclass(frozen=True, kw_only=True)
class ModelFileFacts:
    """What preflight learnt about a model file (from its header and metadata only)."""

    path: Path
    container: Literal["gguf", "ggml"]
    model_type: str
    """What ctransformers is told (``gguf`` for GGUF files)."""
    architecture: str
    context_length: int
    """From the metadata; 0 when unknown (legacy files)."""
    vocab_size: int
    """From the metadata; 0 when unknown (legacy files)."""
    parameters: int
    """Sum of the tensors' element counts; 0 when unknown (legacy files)."""
    dtype: str
    """The quantisation, e.g. ``Q4_K_M`` or ``F16``; ``ggml`` for legacy files."""
    file_size: int
    chat_template: str | None = None
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    """``bos_token``, ``eos_token``, ... as strings, for chat templates."""
    control_tokens: Mapping[str, int] = field(default_factory=dict)
    """Control and user-defined tokens (text → id): split out of prompts before tokenising."""
    stop_ids: frozenset[int] = frozenset()


class _GGUFTensor(Protocol):
    """The part of `gguf.ReaderTensor` used here."""

    @property
    def name(self) -> str: ...

    @property
    def tensor_type(self) -> int: ...

    @property
    def n_elements(self) -> int: ...

    @property
    def shape(self) -> Sized: ...


class _GGUFFile(GGUFMetadata, Protocol):
    """The part of `gguf.GGUFReader` used here: metadata fields and tensors."""

    @property
    def tensors(self) -> Sequence[_GGUFTensor]: ...


def _open_gguf(path: Path) -> _GGUFFile:
    from gguf import GGUFReader  # lazy: numpy and gguf load only with a GGUF

    try:
        reader: _GGUFFile = GGUFReader(str(path))
    except (OSError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    return reader


def gguf_vocabulary(path: Path) -> str | None:
    """The GGUF file's ``tokenizer.ggml.model`` (``llama`` = SentencePiece, ``gpt2`` = BPE), or
    None when it has none.

    Raises:
        ModelLoadError: not a readable GGUF file.
    """
    value = gguf_value(_open_gguf(path), "tokenizer.ggml.model")
    return value if isinstance(value, str) else None


def file_magic(path: Path) -> str:
    """``gguf``, or the legacy format (``ggml``, ``ggmf``, ``ggjt``, ``ggcc``), by the magic.

    Raises:
        ModelLoadError: unreadable, or neither.
    """
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from exc
    if magic == _GGUF_MAGIC:
        return "gguf"
    if magic in _LEGACY_MAGICS:
        return _LEGACY_MAGICS[magic]
    raise ModelLoadError(f"{path} is neither a GGUF nor a GGML file (magic {magic!r})")


def check_ctransformers_supported(path: Path, *, model_type: str | None = None) -> ModelFileFacts:
    """Preflight: decide from the file's header and metadata whether ctransformers can load it,
    without loading it.

    Args:
        path: a ``.gguf`` file or a legacy GGML file.
        model_type: for legacy GGML files, the architecture (transformers' ``model_type``, e.g.
            from config.json); guessed from the file name when None. Ignored for GGUF.

    Returns:
        The facts the engine needs.

    Raises:
        UnsupportedArchitectureError: an architecture, vocabulary or tensor type ctransformers
            cannot run (a BPE vocabulary names the torch engine instead).
        ModelLoadError: the file is unreadable, malformed, or lacks metadata the library needs.
    """
    magic = file_magic(path)
    if magic == "gguf":
        return _check_gguf(path)
    return _check_legacy(path, magic, model_type)


def _check_gguf(path: Path) -> ModelFileFacts:
    reader = _open_gguf(path)

    def value(key: str) -> object:
        return gguf_value(reader, key)

    architecture = value("general.architecture")
    if not isinstance(architecture, str):
        raise ModelLoadError(f"{path}: GGUF metadata lacks general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            architecture,
            ENGINE,
            f"its GGUF loader knows only {sorted(GGUF_ARCHITECTURES)}; "
            'use the torch engine (harness = "torch") for this model',
        )
    vocabulary = value("tokenizer.ggml.model")
    if vocabulary != SUPPORTED_VOCABULARY:
        kind = "a byte-level BPE" if vocabulary == "gpt2" else f"a {vocabulary!r}"
        raise UnsupportedArchitectureError(
            f"{architecture} with {kind} vocabulary",
            ENGINE,
            f"ctransformers 0.2.27 crashes on GGUF files whose tokenizer.ggml.model is "
            f"{vocabulary!r} (only SentencePiece 'llama' vocabularies work; BPE models such as "
            "Qwen, Llama 3 and SmolLM2 do not); load this model with the torch engine "
            '(harness = "torch") instead',
        )
    required: tuple[str, ...] = (
        f"{architecture}.context_length",
        f"{architecture}.embedding_length",
        f"{architecture}.block_count",
        f"{architecture}.attention.head_count",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
    )
    if architecture == "llama":
        required += (
            f"{architecture}.feed_forward_length",
            f"{architecture}.attention.layer_norm_rms_epsilon",
        )
    missing = [key for key in required if key not in reader.fields]
    if missing:
        raise ModelLoadError(
            f"{path}: GGUF metadata lacks {', '.join(missing)} (ctransformers needs them)"
        )
    tensors = list(reader.tensors)
    names = {t.name for t in tensors}
    for name in ("token_embd.weight", "output.weight"):
        if name not in names:
            detail = (
                " (tied embeddings are not supported by its llama.cpp)"
                if name == "output.weight"
                else ""
            )
            raise UnsupportedArchitectureError(
                f"{architecture} without {name}",
                ENGINE,
                f"ctransformers needs the tensor {name}{detail}; use the torch engine",
            )
    unknown = sorted(
        {_type_name(t.tensor_type) for t in tensors if int(t.tensor_type) not in _GGML_TYPES}
    )
    if unknown:
        raise UnsupportedArchitectureError(
            f"{architecture} with {', '.join(unknown)} tensors",
            ENGINE,
            "the ggml inside ctransformers 0.2.27 predates these quantisation types; "
            "use the torch engine or a Q4_0/Q4_K/Q5_K/Q6_K/Q8_0/F16 file",
        )

    tokens_value = value("tokenizer.ggml.tokens")
    types_value = value("tokenizer.ggml.token_type")
    tokens = [str(t) for t in tokens_value] if isinstance(tokens_value, list) else []
    types = list(types_value) if isinstance(types_value, list) else []
    control = {
        tokens[i]: i
        for i, kind in enumerate(types[: len(tokens)])
        if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED) and tokens[i]
    }
    special: dict[str, str] = {}
    # llama.cpp's defaults for SentencePiece vocabularies, overridden by the metadata.
    special_ids = {"bos_token": 1, "eos_token": 2, "unk_token": 0}
    for key, meta in _SPECIAL_TOKEN_KEYS:
        found = value(f"tokenizer.ggml.{meta}")
        if isinstance(found, int) and not isinstance(found, bool):
            special_ids[key] = found
    for key, token_id in special_ids.items():
        if 0 <= token_id < len(tokens):
            special[key] = tokens[token_id]
    stop_ids = {special_ids["eos_token"]}
    eot = value("tokenizer.ggml.eot_token_id")
    if isinstance(eot, int) and not isinstance(eot, bool):
        stop_ids.add(eot)
    stop_ids.update(i for i, token in enumerate(tokens) if token in CHATML_STOP_TOKENS)
    context_length = value(f"{architecture}.context_length")
    template = value("tokenizer.chat_template")
    return ModelFileFacts(
        path=path,
        container="gguf",
        model_type="gguf",
        architecture=architecture,
        context_length=context_length if isinstance(context_length, int) else 0,
        vocab_size=len(tokens),
        parameters=sum(int(t.n_elements) for t in tensors),
        dtype=_gguf_dtype(value("general.file_type"), tensors),
        file_size=path.stat().st_size,
        chat_template=template if isinstance(template, str) else None,
        special_tokens=special,
        control_tokens=control,
        stop_ids=frozenset(i for i in stop_ids if 0 <= i < len(tokens)),
    )


def _type_name(tensor_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(int(tensor_type)).name
    except ValueError:
        return f"type {int(tensor_type)}"


def _gguf_dtype(file_type: object, tensors: Sequence[_GGUFTensor]) -> str:
    """``general.file_type`` by name (``Q4_K_M``), else the type holding most weights."""
    from gguf import LlamaFileType

    if isinstance(file_type, int) and not isinstance(file_type, bool):
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    weights: dict[str, int] = {}
    for tensor in tensors:
        if len(tensor.shape) >= 2:
            name = _type_name(tensor.tensor_type)
            weights[name] = weights.get(name, 0) + int(tensor.n_elements)
    return max(weights, key=lambda name: weights[name]) if weights else "unknown"


def _check_legacy(path: Path, magic: str, model_type: str | None) -> ModelFileFacts:
    hint = (model_type or "").lower()
    resolved = LEGACY_MODEL_TYPES.get(hint.replace("-", "_")) or LEGACY_MODEL_TYPES.get(hint)
    if resolved is None and model_type is not None:
        raise UnsupportedArchitectureError(
            model_type,
            ENGINE,
            f"legacy GGML files must be one of {sorted(LEGACY_MODEL_TYPES)}",
        )
    if resolved is None:
        name = path.name.lower()
        resolved = next((t for hint_, t in _LEGACY_NAME_HINTS if hint_ in name), None)
    if resolved is None:
        resolved = {"ggmf": "llama", "ggjt": "llama", "ggcc": "falcon"}.get(magic)
    if resolved is None:
        raise UnsupportedArchitectureError(
            "unknown (legacy GGML)",
            ENGINE,
            "a legacy GGML file does not name its architecture; provide a config.json with "
            f"model_type (one of {sorted(LEGACY_MODEL_TYPES)}) or convert it to GGUF",
        )
    return ModelFileFacts(
        path=path,
        container="ggml",
        model_type=resolved,
        architecture=resolved,
        context_length=0,
        vocab_size=0,
        parameters=0,
        dtype="ggml",
        file_size=path.stat().st_size,
    )


# --------------------------------------------------------------------------- the worker process


class _Died:
    """Queued to every waiting request when the worker process ends."""


_DIED: Final = _Died()
_Inbox = queue.SimpleQueue["proto.Reply | _Died"]


class WorkerProcess:
    """One worker process holding one loaded model, and the requests waiting on it.

    Thread-safe: several threads may have requests in flight (a reader thread routes replies by
    request id).
    """

    def __init__(self, request: proto.Load, *, model_id: str) -> None:
        """Start the worker and load the model; blocking.

        Raises:
            ModelLoadError: the worker could not start, the library refused the file, or the
                worker died while loading it.
        """
        self.model_id = model_id
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-P", str(WORKER_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,  # a terminal's Ctrl-C is for the neuron, not the worker
            )
        except OSError as exc:
            raise ModelLoadError(f"cannot start the ctransformers worker: {exc}") from exc
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None
        assert stdout is not None
        self._stdin: IO[bytes] = stdin
        self._stdout: IO[bytes] = stdout
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending: dict[int, _Inbox] = {}
        self._ids = itertools.count(1)
        self._dead: str | None = None
        self._closing = False
        try:
            self._write(request)
            body = proto.read_frame(stdout)
        except OSError:
            body = None
        if body is None:
            self._abort()
            raise ModelLoadError(
                f"the ctransformers worker process died while loading {request.path} "
                f"({describe_exit(self._proc.returncode)})"
            )
        reply = proto.decode_reply(body)
        if not isinstance(reply, proto.Loaded):
            self._abort()
            message = reply.message if isinstance(reply, proto.Failed) else repr(reply)
            raise ModelLoadError(f"ctransformers could not load {request.path}: {message}")
        self.loaded = reply
        self._reader = threading.Thread(
            target=self._read_replies, name=f"ctransformers-{self.pid}", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the worker still serves requests."""
        with self._lock:
            return self._dead is None

    def submit(self, make: Callable[[int], proto.Request]) -> tuple[int, _Inbox]:
        """Send the request ``make(rid)`` and return its id and the queue its replies arrive on.

        Raises:
            WorkerDiedError: the worker is gone.
        """
        inbox: _Inbox = queue.SimpleQueue()
        with self._lock:
            if self._dead is not None:
                raise self._died_error()
            rid = next(self._ids)
            self._pending[rid] = inbox
        try:
            self._write(make(rid))
        except OSError:
            pass  # the worker died: the reader thread puts _DIED on the queue
        return rid, inbox

    def cancel(self, rid: int) -> None:
        """Ask the worker to stop request ``rid`` (no reply is awaited)."""
        self.release(rid)
        if self.alive:
            try:
                self._write(proto.Cancel(rid=rid))
            except OSError:
                pass

    def release(self, rid: int) -> None:
        """Stop routing replies of ``rid`` (later ones are dropped)."""
        with self._lock:
            self._pending.pop(rid, None)

    def call(self, make: Callable[[int], proto.Request], timeout: float) -> proto.Reply:
        """Send a request and wait for its single reply.

        Raises:
            WorkerDiedError: the worker died.
            CTransformersError: no reply within ``timeout`` seconds.
        """
        rid, inbox = self.submit(make)
        try:
            reply = inbox.get(timeout=timeout)
        except queue.Empty:
            raise CTransformersError(
                f"the ctransformers worker did not answer within {timeout:.0f} s"
            ) from None
        finally:
            self.release(rid)
        if isinstance(reply, _Died):
            raise self._died_error()
        return reply

    def died_error(self) -> WorkerDiedError:
        """The error for requests cut off by the worker's death."""
        return self._died_error()

    def _died_error(self) -> WorkerDiedError:
        if self._closing:
            message = f"the model '{self.model_id}' was closed while the request ran"
        else:
            message = (
                f"the ctransformers worker process for '{self.model_id}' died "
                f"({self._dead or 'unknown cause'}); the model restarts it on its next request"
            )
        return WorkerDiedError(message, returncode=self._proc.returncode)

    def _write(self, message: proto.Request) -> None:
        frame = proto.encode_frame(message)
        with self._write_lock:
            self._stdin.write(frame)
            self._stdin.flush()

    def _read_replies(self) -> None:
        stdout = self._stdout
        try:
            while (body := proto.read_frame(stdout)) is not None:
                reply = proto.decode_reply(body)
                with self._lock:
                    inbox = self._pending.get(reply.rid)
                if inbox is not None:
                    inbox.put(reply)
        except (OSError, ValueError) as exc:
            logger.warning("ctransformers worker %d: bad reply stream: %s", self.pid, exc)
        returncode = self._proc.wait()
        with self._lock:
            self._dead = "closed" if self._closing else describe_exit(returncode)
            waiting = list(self._pending.values())
            self._pending.clear()
        if not self._closing:
            logger.error(
                "ctransformers worker %d for %s died (%s)", self.pid, self.model_id, self._dead
            )
        for inbox in waiting:
            inbox.put(_DIED)

    def close(self) -> None:
        """Stop the worker (politely, then by force) and release its pipes."""
        with self._lock:
            self._closing = True
        try:
            self._write(proto.Shutdown())
        except OSError:
            pass  # already gone
        try:
            self._stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=_CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
        reader = getattr(self, "_reader", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=_CLOSE_TIMEOUT)
        self._stdout.close()

    def kill(self) -> None:
        """Kill the worker at once (its pipes stay open until `close`)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def _abort(self) -> None:
        """A failed start: kill the worker and release its pipes."""
        self.kill()
        for pipe in (self._stdin, self._stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _stop_worker(worker: WorkerProcess) -> None:
    """Finalizer of a model dropped without `close`."""
    worker.close()


# --------------------------------------------------------------------------- engine and model


def _read_json(path: Path | None) -> dict[str, object] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return value


def _configured_tokens(tokenizer_config: Mapping[str, object] | None) -> dict[str, str]:
    """Special token strings set in tokenizer_config.json (a string or ``{"content": ...}``)."""
    found: dict[str, str] = {}
    for key, _ in _SPECIAL_TOKEN_KEYS:
        value = (tokenizer_config or {}).get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    return found


def _int_ids(value: object) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class CTransformersEngine:
    """Loads GGUF (llama, SentencePiece vocabulary) and legacy GGML models into ctransformers,
    one worker process per model."""

    name = ENGINE

    def __init__(
        self,
        *,
        threads: int | None = None,
        lib: str | None = None,
        context_length: int | None = None,
        batch_size: int = 256,
        use_chat_template: bool = True,
    ) -> None:
        """Configure the engine.

        Args:
            threads: threads per evaluation; None uses the library's default (all cores up to
                4, half of them above).
            lib: ctransformers build (``avx2``, ``avx``, ``basic`` or a path to a
                ``libctransformers`` library); None picks by the CPU's flags.
            context_length: cap on the KV-cache length (memory grows with it); None uses the
                model's trained context length.
            batch_size: prompt tokens per evaluation (1..512); cancellation is checked between
                batches.
            use_chat_template: false forces the ChatML template (``NEURON_USE_CHAT_TEMPLATE``).

        Raises:
            ValueError: a non-positive thread count, context length or batch size, or a batch
                size above 512.
        """
        if threads is not None and threads < 1:
            raise ValueError("threads must be positive")
        if context_length is not None and context_length < 1:
            raise ValueError("context_length must be positive")
        if not 1 <= batch_size <= _MAX_BATCH:
            raise ValueError(f"batch_size must be in [1, {_MAX_BATCH}]")
        self.threads = threads
        self.lib = lib or detect_lib()
        self.context_length = context_length
        self.batch_size = batch_size
        self.use_chat_template = use_chat_template

    def load(self, files: ModelFiles, progress: ProgressCallback) -> CTransformersModel:
        """Preflight the file, then start a worker process that loads it; blocking.

        Raises:
            UnsupportedArchitectureError: the format, architecture, vocabulary (BPE) or tensor
                types are not supported (raised before any process starts).
            ModelLoadError: files missing or malformed, or the library failed or crashed.
        """
        started = time.perf_counter()
        progress(0.0, "reading model metadata")
        if files.format != "gguf":
            raise UnsupportedArchitectureError(
                files.format,
                ENGINE,
                "it loads GGUF and GGML files only; use the torch engine for safetensors",
            )
        if len(files.weights) != 1:
            raise ModelLoadError(f"{files.model_id}: expected exactly one model file")
        config = _read_json(files.config)
        config_type = (config or {}).get("model_type")
        facts = check_ctransformers_supported(
            files.weights[0], model_type=config_type if isinstance(config_type, str) else None
        )
        tokenizer_config = _read_json(files.tokenizer_config)
        generation_config = _read_json(files.generation_config)

        context = facts.context_length if facts.context_length > 0 else None
        if self.context_length is not None:
            context = min(context or self.context_length, self.context_length)
        request = proto.Load(
            path=str(facts.path),
            model_type=facts.model_type,
            lib=self.lib,
            context_length=context or -1,
            threads=self.threads if self.threads is not None else -1,
            batch_size=min(self.batch_size, context or _MAX_BATCH),
        )
        progress(0.1, "starting the ctransformers worker")
        worker = WorkerProcess(request, model_id=files.model_id)
        loaded = worker.loaded
        special = dict(facts.special_tokens)
        control = dict(facts.control_tokens)
        if facts.container == "ggml":
            # No metadata: the library's own BOS/EOS, when they are special-token text such as
            # <|endoftext|> (its tokenizer would split them into characters).
            for key, token_id, piece in (
                ("eos_token", loaded.eos_id, loaded.eos_piece),
                ("bos_token", loaded.bos_id, loaded.bos_piece),
            ):
                text = piece.decode("utf-8", errors="replace")
                if _SPECIAL_TEXT.fullmatch(text):
                    special.setdefault(key, text)
                    control.setdefault(text, token_id)
        special.update(_configured_tokens(tokenizer_config))
        try:
            template = self._chat_template(files, tokenizer_config, facts.chat_template, special)
        except ModelLoadError:
            worker.close()
            raise
        stop_ids = set(facts.stop_ids) | {loaded.eos_id}
        stop_ids.update(_int_ids((generation_config or {}).get("eos_token_id")))
        for token in (*CHATML_STOP_TOKENS, special.get("eos_token", "")):
            if token in control:
                stop_ids.add(control[token])
        info = ModelInfo(
            model_id=files.model_id,
            engine=ENGINE,
            format="gguf",
            architecture=facts.architecture if facts.container == "gguf" else loaded.architecture,
            context_length=loaded.context_length,
            vocab_size=loaded.vocab_size,
            parameters=facts.parameters,
            memory_bytes=facts.file_size,
            device="cpu",
            dtype=facts.dtype,
        )
        logger.info(
            "loaded %s (%s %s, %s, %.1fM parameters, %.0f MiB, context %d) in worker %d in %.2f s",
            files.model_id,
            facts.container,
            info.architecture,
            info.dtype,
            info.parameters / 1e6,
            info.memory_bytes / 2**20,
            info.context_length,
            worker.pid,
            time.perf_counter() - started,
        )
        progress(1.0, "ready")
        return CTransformersModel(
            worker=worker,
            request=request,
            info=info,
            template=template,
            control_tokens=control,
            stop_ids=frozenset(i for i in stop_ids if 0 <= i < loaded.vocab_size),
            strip_leading_space=info.architecture == "llama",
        )

    def _chat_template(
        self,
        files: ModelFiles,
        tokenizer_config: Mapping[str, object] | None,
        gguf_template: str | None,
        special: Mapping[str, str],
    ) -> ChatTemplate:
        try:
            template = ChatTemplate.resolve(
                chat_template_file=files.chat_template,
                tokenizer_config=tokenizer_config,
                gguf_template=gguf_template,
                special_tokens=special,
                use_model_template=self.use_chat_template,
            )
        except ChatTemplateError as exc:
            raise ModelLoadError(f"{files.model_id}: {exc}") from exc
        logger.debug("%s: chat template from %s", files.model_id, template.origin)
        return template


class CTransformersModel:
    """A model loaded in a ctransformers worker process (the `LoadedModel` of this engine)."""

    def __init__(
        self,
        *,
        worker: WorkerProcess,
        request: proto.Load,
        info: ModelInfo,
        template: ChatTemplate,
        control_tokens: Mapping[str, int],
        stop_ids: frozenset[int],
        strip_leading_space: bool,
    ) -> None:
        """Wrap a started worker; use `CTransformersEngine.load` to build one."""
        self._worker: WorkerProcess | None = worker
        self._request = request
        self._info = info
        self.chat_template = template
        self._control = dict(control_tokens)
        self._control_pattern = (
            re.compile("|".join(re.escape(t) for t in sorted(self._control, key=len, reverse=True)))
            if self._control
            else None
        )
        self.stop_ids = stop_ids
        self._strip_leading_space = strip_leading_space
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_worker, worker)
        self.restarts = 0
        """How many times a dead worker was replaced."""

    @property
    def info(self) -> ModelInfo:
        """Facts about the model."""
        return self._info

    @property
    def worker_pid(self) -> int:
        """The current worker process's id (for diagnostics and tests; it may have died).

        Raises:
            ModelNotLoadedError: after `close`.
        """
        with self._lock:
            if self._worker is None:
                raise ModelNotLoadedError(self._info.model_id)
            return self._worker.pid

    @property
    def worker_alive(self) -> bool:
        """Whether the worker process serves requests (a dead one restarts on the next)."""
        with self._lock:
            return self._worker is not None and self._worker.alive

    def _live_worker(self) -> WorkerProcess:
        """The worker, restarted first if it died.

        Raises:
            ModelNotLoadedError: after `close`.
            ModelLoadError: the restart failed.
        """
        with self._lock:
            worker = self._worker
            if worker is None:
                raise ModelNotLoadedError(self._info.model_id)
            if worker.alive:
                return worker
            logger.warning(
                "%s: restarting the ctransformers worker after it died", self._info.model_id
            )
            self._finalizer.detach()
            worker.close()
            worker = WorkerProcess(self._request, model_id=self._info.model_id)
            self._worker = worker
            self._finalizer = weakref.finalize(self, _stop_worker, worker)
            self.restarts += 1
            return worker

    def render_chat(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        template_kwargs: Mapping[str, TemplateValue] | None = None,
    ) -> str:
        """`ChatTemplate.render_or_chatml` with this model's template.

        Raises:
            ChatTemplateError: the template failed and tools were present (or ChatML failed).
        """
        return self.chat_template.render_or_chatml(messages, tools=tools,
                                                   template_kwargs=template_kwargs)

    def encode(self, text: str) -> list[int]:
        """Tokenise rendered text without adding special tokens: control tokens written in the
        text (``<s>``, ``</s>``, ...) become their ids, the text between them is tokenised by the
        library in the worker (thread-safe; answered even while a generation runs).

        Raises:
            WorkerDiedError: the worker died meanwhile.
            ModelNotLoadedError: after `close`.
        """
        pieces: list[str | int] = []
        if self._control_pattern is None:
            pieces.append(text)
        else:
            position = 0
            for match in self._control_pattern.finditer(text):
                pieces.append(text[position : match.start()])
                pieces.append(self._control[match.group()])
                position = match.end()
            pieces.append(text[position:])
        segments = [p for p in pieces if isinstance(p, str) and p]
        if not segments:
            return [p for p in pieces if isinstance(p, int)]
        reply = self._live_worker().call(
            lambda rid: proto.Tokenize(rid=rid, segments=segments), _TOKENIZE_TIMEOUT
        )
        if not isinstance(reply, proto.Tokens) or len(reply.ids) != len(segments):
            raise CTransformersError(f"unexpected tokenizer reply from the worker: {reply!r}")
        tokenized = iter(reply.ids)
        ids: list[int] = []
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
            elif piece:
                ids.extend(next(tokenized))
        return ids

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        cancelled: threading.Event,
    ) -> Iterator[Step | Finish]:
        """Generate from ``prompt_ids``; see `LoadedModel.generate`.

        Raises:
            ValueError: an empty prompt, or ids outside the vocabulary.
            ModelNotLoadedError: after `close`.
            ModelLoadError: the worker had died and could not be restarted.
            WorkerDiedError: (while iterating) the worker died; the request is lost.
            CTransformersError: (while iterating) the library failed the request.
        """
        vocab = self._info.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt ids must be in [0, {vocab})")
        worker = self._live_worker()
        return self._generate(worker, list(prompt_ids), params, cancelled)

    def _decode(self, pieces: Mapping[int, bytes]) -> Callable[[Sequence[int]], str]:
        strip = self._strip_leading_space

        def decode(ids: Sequence[int]) -> str:
            text = b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
            # SentencePiece: the word-start marker of the first token is not text (as
            # transformers decodes llama vocabularies).
            return text[1:] if strip and text.startswith(" ") else text

        return decode

    def _generate(
        self,
        worker: WorkerProcess,
        prompt: list[int],
        params: GenerationParams,
        cancelled: threading.Event,
    ) -> Iterator[Step | Finish]:
        started = time.perf_counter()
        budget = min(params.max_tokens, self._info.context_length - len(prompt))
        if budget <= 0:
            yield Finish(reason="length", completion_tokens=0)
            return
        rid, inbox = worker.submit(
            lambda rid: proto.Generate(
                rid=rid,
                prompt=prompt,
                max_tokens=budget,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=params.seed,
                repetition_penalty=params.repetition_penalty,
                repetition_window=params.repetition_window,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                stop_ids=sorted(self.stop_ids),
            )
        )
        pieces: dict[int, bytes] = {}
        detokenizer = IncrementalDetokenizer(self._decode(pieces))
        stopper = StopMatcher(params.stop)
        generated = 0
        reason: FinishReason = "length"
        prefilled: float | None = None
        open_request = True
        try:
            while True:
                if cancelled.is_set():
                    reason = "cancelled"
                    break
                try:
                    reply = inbox.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    continue
                if isinstance(reply, _Died):
                    open_request = False
                    raise worker.died_error()
                if isinstance(reply, proto.Token):
                    if prefilled is None:
                        prefilled = time.perf_counter()
                    generated += 1
                    pieces[reply.token_id] = reply.piece
                    text, matched = stopper.push(detokenizer.push(reply.token_id))
                    yield Step(reply.token_id, text)
                    if matched is not None:
                        now = time.perf_counter()
                        yield Finish(
                            reason="stop",
                            completion_tokens=generated,
                            stop_sequence=matched,
                            prefill_seconds=prefilled - started,
                            decode_seconds=now - prefilled,
                        )
                        return
                    if generated >= budget:
                        open_request = False  # the worker stops here by itself
                        break
                elif isinstance(reply, proto.Done):
                    open_request = False
                    reason = reply.reason
                    break
                else:
                    open_request = False
                    message = reply.message if isinstance(reply, proto.Failed) else repr(reply)
                    raise CTransformersError(f"ctransformers failed while generating: {message}")
        finally:
            if open_request:
                worker.cancel(rid)
            else:
                worker.release(rid)
        now = time.perf_counter()
        if prefilled is None:
            prefilled = now
        tail, matched = stopper.push(detokenizer.flush())
        if matched is None:
            tail += stopper.flush()
        yield Finish(
            reason="stop" if matched is not None else reason,
            completion_tokens=generated,
            text=tail,
            stop_sequence=matched,
            prefill_seconds=prefilled - started,
            decode_seconds=now - prefilled,
        )

    def close(self) -> None:
        """Stop the worker process (the model's memory goes with it)."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._finalizer.detach()
            worker.close()
