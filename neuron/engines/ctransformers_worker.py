"""The child side of the ctransformers engine: one model in its own process.

ctransformers 0.2.27 is a C++ library (an old llama.cpp and the ggml example models) that can take
the whole process down: it segfaults loading BPE-vocabulary GGUFs, trusts every file it reads,
and its Python ``tokenize`` wrapper overflows the heap on non-ASCII text. So the neuron never
loads it in-process. `CTransformersEngine` starts this file as a script
(``python -P ctransformers_worker.py``) and talks to it over its stdin and stdout:

* frames are a 4-byte little-endian length and a msgpack body, one tagged `msgspec.Struct` each;
* the first request is `Load`, answered by `Loaded` or `Failed`;
* then `Tokenize` (answered at once, from a reader thread, even while a generation runs),
  `Generate` (answered by a stream of `Token`\\ s and one `Done` or `Failed`), `Cancel` (checked
  between prompt chunks and between tokens) and `Shutdown`;
* end of input (the neuron died) ends the worker too.

The worker binds the library's C API with ctypes directly instead of importing the
``ctransformers`` package: that skips its 0.3 s import of huggingface-hub on every start and its
Python ``tokenize``, which sizes the output buffer by characters rather than bytes and overflows
the heap on non-ASCII text. C code that prints to stdout would corrupt the frames, so the worker
moves the protocol to a duplicate of fd 1 and points fd 1 at stderr before loading anything.

This module imports only the standard library and msgspec: the neuron imports it for the message
types, and the worker process runs it without the ``neuron`` package on its path.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final, Literal

import msgspec

# --------------------------------------------------------------------------- protocol

#: ``rid`` of the replies to `Load`.
LOAD_RID: Final = 0


class Load(msgspec.Struct, tag="load", kw_only=True):
    """Load ``path`` (the first request)."""

    path: str
    model_type: str
    """ctransformers' model type: ``gguf`` for GGUF files, else ``gpt2``, ``llama``, ``mpt``..."""
    lib: str
    """``avx2``, ``avx``, ``basic`` or a path to a ``libctransformers`` shared library."""
    context_length: int
    """KV-cache length; llama.cpp's default (512) when not positive."""
    threads: int
    """Threads per evaluation; the library's default (half the cores above 4) when negative."""
    batch_size: int
    """Prompt tokens per evaluation (llama.cpp sizes its buffers for 512)."""


class Loaded(msgspec.Struct, tag="loaded", kw_only=True):
    rid: int = LOAD_RID
    vocab_size: int
    context_length: int
    eos_id: int
    bos_id: int
    eos_piece: bytes
    bos_piece: bytes
    architecture: str


class Tokenize(msgspec.Struct, tag="tokenize", kw_only=True):
    """Tokenise each segment (llama vocabularies prepend a space to each, as SentencePiece)."""

    rid: int
    segments: list[str]
    add_bos: bool = False


class Tokens(msgspec.Struct, tag="tokens", kw_only=True):
    rid: int
    ids: list[list[int]]


class Generate(msgspec.Struct, tag="generate", kw_only=True):
    """Generate from ``prompt``; ``temperature <= 0`` is greedy, ``top_k <= 0`` disables top-k."""

    rid: int
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    repetition_penalty: float
    repetition_window: int
    presence_penalty: float
    frequency_penalty: float
    stop_ids: list[int]


class Token(msgspec.Struct, tag="token", kw_only=True):
    """One sampled token and its bytes (a byte token is a single, possibly partial, byte)."""

    rid: int
    token_id: int
    piece: bytes


_Reason = Literal["stop", "length", "cancelled"]


class Done(msgspec.Struct, tag="done", kw_only=True):
    rid: int
    reason: _Reason
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float


class Failed(msgspec.Struct, tag="failed", kw_only=True):
    rid: int
    message: str


class Cancel(msgspec.Struct, tag="cancel", kw_only=True):
    rid: int


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


Request = Load | Tokenize | Generate | Cancel | Shutdown
Reply = Loaded | Tokens | Token | Done | Failed

_HEADER: Final = 4
_encoder: Final = msgspec.msgpack.Encoder()
_requests: Final = msgspec.msgpack.Decoder(Request)
_replies: Final = msgspec.msgpack.Decoder(Reply)


def encode_frame(message: Request | Reply) -> bytes:
    """A length-prefixed msgpack frame."""
    body = _encoder.encode(message)
    return len(body).to_bytes(_HEADER, "little") + body


def read_frame(stream: IO[bytes]) -> bytes | None:
    """The body of the next frame; None at end of stream (also mid-frame: the writer died)."""
    header = _read_exactly(stream, _HEADER)
    if header is None:
        return None
    return _read_exactly(stream, int.from_bytes(header, "little"))


def decode_request(body: bytes) -> Request:
    """Decode a frame body sent to the worker."""
    request: Request = _requests.decode(body)
    return request


def decode_reply(body: bytes) -> Reply:
    """Decode a frame body sent by the worker."""
    reply: Reply = _replies.decode(body)
    return reply


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size > 0:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- the library

_IntArray = ctypes.POINTER(ctypes.c_int)
_FloatArray = ctypes.POINTER(ctypes.c_float)
_LIBRARY_FILES: Final = {"darwin": "libctransformers.dylib", "win32": "ctransformers.dll"}


class _ConfigStruct(ctypes.Structure):
    _fields_ = (
        ("context_length", ctypes.c_int),
        ("gpu_layers", ctypes.c_int),
        ("mmap", ctypes.c_bool),
        ("mlock", ctypes.c_bool),
    )


def library_path(lib: str) -> Path:
    """The shared library for ``lib`` (a variant name, or a path to the library itself).

    Raises:
        RuntimeError: ctransformers is not installed.
    """
    if lib not in ("avx2", "avx", "basic"):
        return Path(lib)
    spec = importlib.util.find_spec("ctransformers")  # locates, never imports, the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the ctransformers package is not installed (pip install ctransformers)")
    package = Path(next(iter(spec.submodule_search_locations)))
    return package / "lib" / lib / _LIBRARY_FILES.get(sys.platform, "libctransformers.so")


class Library:
    """The C API of ``libctransformers`` (the functions ctransformers' ``llm.py`` binds)."""

    def __init__(self, path: Path) -> None:
        """Load the shared library at ``path``.

        Raises:
            OSError: it cannot be loaded.
        """
        c = ctypes
        dll = c.CDLL(str(path))
        llm = c.c_void_p
        signatures: dict[str, tuple[list[object], object]] = {
            "ctransformers_llm_create": ([c.c_char_p, c.c_char_p, _ConfigStruct], llm),
            "ctransformers_llm_delete": ([llm], None),
            "ctransformers_llm_tokenize": ([llm, c.c_char_p, c.c_bool, _IntArray], c.c_int),
            "ctransformers_llm_detokenize": ([llm, c.c_int], c.c_char_p),
            "ctransformers_llm_eos_token_id": ([llm], c.c_int),
            "ctransformers_llm_bos_token_id": ([llm], c.c_int),
            "ctransformers_llm_vocab_size": ([llm], c.c_int),
            "ctransformers_llm_context_length": ([llm], c.c_int),
            "ctransformers_llm_architecture": ([llm], c.c_char_p),
            "ctransformers_llm_batch_eval": (
                [llm, _IntArray, c.c_int, c.c_int, c.c_int, c.c_int],
                c.c_bool,
            ),
            "ctransformers_llm_logits_data": ([llm], _FloatArray),
            "ctransformers_llm_logits_size": ([llm], c.c_int),
            "ctransformers_llm_sample": (
                [llm, _IntArray, c.c_int, c.c_int, c.c_float, c.c_float, c.c_float, c.c_int],
                c.c_int,
            ),
        }
        for name, (argtypes, restype) in signatures.items():
            function = getattr(dll, name)
            function.argtypes = argtypes
            function.restype = restype
        self.dll = dll


class Model:
    """One loaded model and the tokens its KV cache holds (reused across generations)."""

    def __init__(self, request: Load) -> None:
        """Load the model.

        Raises:
            RuntimeError: the library refused the file.
            OSError: the library cannot be loaded.
        """
        self.lib = Library(library_path(request.lib)).dll
        config = _ConfigStruct(
            context_length=request.context_length, gpu_layers=0, mmap=True, mlock=False
        )
        handle = self.lib.ctransformers_llm_create(
            request.path.encode(), request.model_type.encode(), config
        )
        if not handle:
            raise RuntimeError(
                f"the library returned no model for model type '{request.model_type}' "
                "(a missing tensor or an unsupported file; any detail it printed is on stderr)"
            )
        self.handle = handle
        self.threads = request.threads
        self.batch_size = max(1, request.batch_size)
        self.vocab_size = int(self.lib.ctransformers_llm_vocab_size(handle))
        self.context_length = int(self.lib.ctransformers_llm_context_length(handle))
        architecture = self.lib.ctransformers_llm_architecture(handle) or b""
        self.architecture = architecture.decode() or request.model_type
        self.evaluated: list[int] = []
        """Tokens whose keys and values the library's cache holds, in order."""

    def loaded(self) -> Loaded:
        eos = int(self.lib.ctransformers_llm_eos_token_id(self.handle))
        bos = int(self.lib.ctransformers_llm_bos_token_id(self.handle))
        return Loaded(
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            eos_id=eos,
            bos_id=bos,
            eos_piece=self.piece(eos),
            bos_piece=self.piece(bos),
            architecture=self.architecture,
        )

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """Tokenise ``text``; thread-safe (reads only the vocabulary)."""
        data = text.encode()
        # At most one token per byte, plus llama's leading space and BOS.
        output = (ctypes.c_int * (len(data) + 8))()
        count = self.lib.ctransformers_llm_tokenize(self.handle, data, add_bos, output)
        return list(output[:count])

    def piece(self, token_id: int) -> bytes:
        """The bytes of one token (empty for control tokens)."""
        piece: bytes | None = self.lib.ctransformers_llm_detokenize(self.handle, token_id)
        return piece or b""

    def evaluate(self, tokens: Sequence[int]) -> None:
        """Feed ``tokens`` after `evaluated`.

        Raises:
            RuntimeError: the library failed (the cache is then forgotten).
        """
        array = (ctypes.c_int * len(tokens))(*tokens)
        ok = self.lib.ctransformers_llm_batch_eval(
            self.handle, array, len(tokens), len(self.evaluated), len(tokens), self.threads
        )
        if not ok:
            self.evaluated = []
            raise RuntimeError("ctransformers failed to evaluate tokens")
        self.evaluated.extend(tokens)

    def sample(
        self, request: Generate, generated: Sequence[int], counts: dict[int, int], seed: int
    ) -> int:
        """Sample the next token from the last logits (penalties applied in place first)."""
        if counts and (request.presence_penalty or request.frequency_penalty):
            logits = self.lib.ctransformers_llm_logits_data(self.handle)
            offset = int(self.lib.ctransformers_llm_logits_size(self.handle)) - self.vocab_size
            for token_id, count in counts.items():
                logits[offset + token_id] -= (
                    request.frequency_penalty * count + request.presence_penalty
                )
        window = request.repetition_window if request.repetition_penalty != 1.0 else 0
        recent = list(generated[-window:]) if window > 0 else []
        last = (ctypes.c_int * len(recent))(*recent)
        if request.temperature <= 0:
            # Greedy. The library divides by the temperature, so keep it at 1 and keep 1 token.
            top_k, top_p, temperature = 1, 1.0, 1.0
        else:
            # top_k <= 0 would keep a single token (llama.cpp clamps k to at least 1).
            top_k = request.top_k if 0 < request.top_k < self.vocab_size else self.vocab_size
            top_p, temperature = request.top_p, request.temperature
        token: int = self.lib.ctransformers_llm_sample(
            self.handle,
            last,
            len(recent),
            top_k,
            top_p,
            temperature,
            request.repetition_penalty,
            seed,
        )
        return token


# --------------------------------------------------------------------------- the process


class Worker:
    """The worker's loop: a reader thread answers `Tokenize` and queues the rest; the main
    thread runs generations one at a time."""

    def __init__(self, model: Model, output_fd: int) -> None:
        self.model = model
        self._fd = output_fd
        self._write_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[Generate | None] = queue.SimpleQueue()
        self._cancelled: set[int] = set()
        self._stopping = False
        """Set at `Shutdown` or end of input: the running generation stops too."""

    def send(self, message: Reply) -> None:
        with self._write_lock:
            write_all(self._fd, encode_frame(message))

    def read_requests(self, stream: IO[bytes]) -> None:
        """The reader thread: runs until end of input or `Shutdown`."""
        try:
            while (body := read_frame(stream)) is not None:
                request = decode_request(body)
                if isinstance(request, Tokenize):
                    self._tokenize(request)
                elif isinstance(request, Cancel):
                    self._cancelled.add(request.rid)
                elif isinstance(request, Generate):
                    self._inbox.put(request)
                elif isinstance(request, Shutdown):
                    break
        except (OSError, msgspec.DecodeError) as exc:
            sys.stderr.write(f"ctransformers worker: stopping: {type(exc).__name__}: {exc}\n")
        finally:
            self._stopping = True
            self._inbox.put(None)

    def _tokenize(self, request: Tokenize) -> None:
        try:
            ids = [self.model.tokenize(s, request.add_bos) for s in request.segments]
        except (ValueError, UnicodeError) as exc:
            self.send(Failed(rid=request.rid, message=f"{type(exc).__name__}: {exc}"))
            return
        self.send(Tokens(rid=request.rid, ids=ids))

    def _stop(self, rid: int) -> bool:
        return self._stopping or rid in self._cancelled

    def run(self) -> None:
        """The main thread: generations in arrival order until the reader stops."""
        while (request := self._inbox.get()) is not None:
            try:
                self.generate(request)
            except OSError:
                raise  # the neuron is gone (broken pipe): nobody to tell
            except Exception as exc:  # noqa: BLE001 - reported to the neuron for this request
                self.send(Failed(rid=request.rid, message=f"{type(exc).__name__}: {exc}"))
            finally:
                self._cancelled.discard(request.rid)

    def generate(self, request: Generate) -> None:
        model = self.model
        rid = request.rid
        started = time.perf_counter()

        def done(reason: _Reason, count: int, prefilled: float) -> None:
            now = time.perf_counter()
            self.send(
                Done(
                    rid=rid,
                    reason=reason,
                    completion_tokens=count,
                    prefill_seconds=prefilled - started,
                    decode_seconds=now - prefilled,
                )
            )

        prompt = request.prompt
        budget = min(request.max_tokens, model.context_length - len(prompt))
        if budget <= 0 or not prompt:
            done("length", 0, time.perf_counter())
            return
        # Reuse the cached prefix, keeping at least one prompt token to produce logits.
        keep = 0
        limit = min(len(prompt) - 1, len(model.evaluated))
        while keep < limit and prompt[keep] == model.evaluated[keep]:
            keep += 1
        del model.evaluated[keep:]
        pending = prompt[keep:]
        for start in range(0, len(pending), model.batch_size):
            if self._stop(rid):
                done("cancelled", 0, time.perf_counter())
                return
            model.evaluate(pending[start : start + model.batch_size])
        prefilled = time.perf_counter()

        rng = random.Random(request.seed) if request.seed is not None else random.SystemRandom()
        stop_ids = frozenset(request.stop_ids)
        generated: list[int] = []
        counts: dict[int, int] = {}
        reason: _Reason = "length"
        while True:
            if self._stop(rid):
                reason = "cancelled"
                break
            # The library reseeds its generator on every call (and with the clock's second when
            # the seed is negative), so each step gets a fresh seed from our own generator.
            token = model.sample(request, generated, counts, rng.randrange(2**31))
            if token in stop_ids:
                reason = "stop"
                break
            generated.append(token)
            counts[token] = counts.get(token, 0) + 1
            self.send(Token(rid=rid, token_id=token, piece=model.piece(token)))
            if len(generated) >= budget:
                break
            model.evaluate([token])
        done(reason, len(generated), prefilled)


def main() -> int:
    """Serve one model over stdin/stdout (see the module docstring)."""
    output_fd = os.dup(1)
    os.dup2(2, 1)  # anything the library prints goes to stderr, never into the frames
    stdin = sys.stdin.buffer
    body = read_frame(stdin)
    if body is None:
        return 0
    request = decode_request(body)
    if not isinstance(request, Load):
        write_all(output_fd, encode_frame(Failed(rid=LOAD_RID, message="expected a load request")))
        return 2
    try:
        model = Model(request)
    except (OSError, RuntimeError) as exc:
        write_all(output_fd, encode_frame(Failed(rid=LOAD_RID, message=str(exc))))
        return 1
    worker = Worker(model, output_fd)
    worker.send(model.loaded())
    reader = threading.Thread(
        target=worker.read_requests, args=(stdin,), name="requests", daemon=True
    )
    reader.start()
    with contextlib.suppress(OSError):  # the neuron closed our output (it died): just go
        worker.run()
    return 0


if __name__ == "__main__":
    # os._exit: skip interpreter teardown (the library's destructors, the blocked reader thread).
    os._exit(main())
