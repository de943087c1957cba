"""Continuous batching for the torch engine: one step loop per model, on its own thread.

Every step is one forward pass of the decoder over the batch: the next token of each decoding
sequence (one row each, against its own KV cache) plus up to ``prefill_chunk_tokens`` prompt
tokens of the sequences still prefilling, first come first served (chunked prefill). A long
prompt therefore delays the others by one chunk per step, never by its whole length, and many
short prompts that arrive together start in the same step. New sequences join between steps,
up to ``max_batch`` at once (the rest queue, first come first served); finished and cancelled
ones leave at once and free their cache. Each sequence keeps its own sampler, detokenizer and
stop matcher, so its output is the same whether it runs alone or in a batch (tests check it for
float32, bfloat16 and int8 weights).

A prompt that starts like a sequence running or recently finished copies those cached positions
instead of computing them (`neuron.engines.torch_prefix`); prompts that arrive together with the
same beginning compute it once: a sequence whose next block another sequence computes in this
step waits one step and copies it.

A failure of the forward pass fails every sequence in it (they share it); a failure in one
sequence's sampling or text handling fails that sequence alone. The loop goes on either way.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import torch

from neuron.engines.base import (
    STARTED,
    Emit,
    Finish,
    FinishReason,
    GenerationParams,
    Started,
    Step,
)
from neuron.engines.torch_decoder import DecoderModel, KVCache
from neuron.engines.torch_prefix import BLOCK, Cached, PrefixIndex, block_hashes
from neuron.engines.torch_sampler import Sampler
from neuron.errors import ModelNotLoadedError
from neuron.text.detokenize import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

#: KV caches start with room for the prompt plus this many tokens and double as they fill.
_CACHE_HEADROOM: Final = 128


@dataclass(eq=False, frozen=True)
class _Submitted:
    prompt: list[int]
    params: GenerationParams
    cancelled: threading.Event
    emit: Emit


@dataclass(eq=False, kw_only=True)
class _Sequence(Cached):
    """A sequence in the running batch (``tokens``: its prompt, then each token it fed)."""

    prompt: list[int]
    prompt_hashes: list[int]
    cancelled: threading.Event
    emit: Emit
    budget: int
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stopper: StopMatcher
    fed: int = 0
    """Prompt tokens already in the cache."""
    pending: int | None = None
    """The last sampled token, to be fed in the next step (None while prefilling)."""
    generated: int = 0
    started: float = field(default_factory=time.perf_counter)
    prefilled: float | None = None


@dataclass
class BatchStats:
    """What the loop has done (tests and benchmarks read it)."""

    steps: int = 0
    """Forward passes."""
    sequences: int = 0
    largest_batch: int = 0
    """Most sequences in one forward pass."""
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    reused_tokens: int = 0
    """Prompt tokens copied from cached prefixes instead of computed."""


class BatchLoop:
    """The step loop of one loaded model."""

    def __init__(
        self,
        model: DecoderModel,
        *,
        stop_ids: frozenset[int],
        decode: Callable[[Sequence[int]], str],
        vocab_limit: int | None,
        prefill_chunk_tokens: int,
        max_batch: int,
        name: str,
        prefix_retain_bytes: int = 0,
    ) -> None:
        """Start the loop's thread.

        Args:
            prefix_retain_bytes: KV cache bytes of finished sequences kept for prefix reuse
                (0: prefixes are shared only between sequences that run at the same time).
        """
        if max_batch < 1 or prefill_chunk_tokens < 1:
            raise ValueError("max_batch and prefill_chunk_tokens must be positive")
        self._model = model
        self._stop_ids = stop_ids
        self._decode = decode
        self._vocab_limit = vocab_limit
        self._chunk = prefill_chunk_tokens
        self._max_batch = max_batch
        self._device = model.embed_tokens.weight.device
        self._cond = threading.Condition()
        self._queue: collections.deque[_Submitted] = collections.deque()
        self._active: list[_Sequence] = []
        self._prefix = PrefixIndex(retain_bytes=prefix_retain_bytes)
        self._closed = False
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._run, name=f"batch-{name}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._active)

    def submit(self, prompt: Sequence[int], params: GenerationParams,
               cancelled: threading.Event, emit: Emit) -> None:
        """Queue a sequence (see `BatchingModel.submit`).

        Raises:
            ModelNotLoadedError: the loop is closed.
        """
        sequence = _Submitted(list(prompt), params, cancelled, emit)
        with self._cond:
            if self._closed:
                raise ModelNotLoadedError("closed model")
            self._queue.append(sequence)
            self._cond.notify()

    def close(self) -> None:
        """Stop the loop; sequences still queued or running end with `ModelNotLoadedError`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------ the loop (its thread)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._queue and not self._active:
                        self._cond.wait()
                    if self._closed:
                        return
                    joining: list[_Submitted] = []
                    while self._queue and len(self._active) + len(joining) < self._max_batch:
                        joining.append(self._queue.popleft())
                for sequence in joining:
                    self._join(sequence)
                if self._active:
                    self._step_or_fail()
        finally:
            with self._cond:
                left: list[_Submitted | _Sequence] = [*self._active, *self._queue]
                self._active.clear()
                self._queue.clear()
                self._prefix.clear()
            for gone in left:
                _emit(gone, ModelNotLoadedError("the model was unloaded"))

    def _join(self, new: _Submitted) -> None:
        """Start a sequence: its cache, sampler, detokenizer and stop matcher."""
        context = self._model.config.context_length
        budget = min(new.params.max_tokens, context - len(new.prompt))
        self.stats.sequences += 1
        _emit(new, STARTED)
        if budget <= 0:
            _emit(new, Finish(reason="length", completion_tokens=0))
            return
        capacity = min(len(new.prompt) + min(budget, _CACHE_HEADROOM), context)
        self._active.append(_Sequence(
            tokens=list(new.prompt), prompt=new.prompt, prompt_hashes=block_hashes(new.prompt),
            cancelled=new.cancelled, emit=new.emit, budget=budget,
            cache=self._model.new_cache(capacity),
            sampler=Sampler(new.params, self._device, vocab_limit=self._vocab_limit),
            detokenizer=IncrementalDetokenizer(self._decode),
            stopper=StopMatcher(new.params.stop),
        ))

    def _step_or_fail(self) -> None:
        try:
            self._step()
        except Exception as exc:
            log.exception("a batched step failed; failing its %d sequences", len(self._active))
            failed, self._active = self._active, []
            for s in failed:
                self._prefix.discard(s)
                _emit(s, exc)

    @torch.inference_mode()
    def _step(self) -> None:
        for s in [s for s in self._active if s.cancelled.is_set()]:
            self._finish(s, "cancelled")
        decoding = [s for s in self._active if s.pending is not None]
        ids: list[int] = []
        caches: list[KVCache] = []
        counts: list[int] = []
        for s in decoding:
            assert s.pending is not None
            _reserve(s, 1)
            ids.append(s.pending)
            s.tokens.append(s.pending)
            caches.append(s.cache)
            counts.append(1)
        # Prompts share one chunk's worth of tokens per step, first come first served. Each is
        # fed in the same pieces as alone (chunk-aligned), so its numbers do not depend on who
        # it shares steps with; a piece that does not fit waits for the next step. Cached
        # prefixes are copied first; a block another prompt computes in this step is copied
        # in the next one instead of being computed twice.
        prefilling: list[tuple[_Sequence, int]] = []
        computing: set[int] = set()
        room = self._chunk
        for s in self._active:
            if s.pending is None:
                if s.fed % BLOCK == 0:
                    s.fed += self._prefix.adopt(s, s.prompt_hashes, upto=len(s.prompt) - 1)
                    self.stats.reused_tokens = self._prefix.reused_tokens
                    block = s.fed // BLOCK
                    if block < len(s.prompt_hashes) and s.prompt_hashes[block] in computing:
                        continue
                take = min(len(s.prompt) - s.fed, self._chunk - s.fed % self._chunk)
                if take > room:
                    break
                ids.extend(s.prompt[s.fed : s.fed + take])
                caches.append(s.cache)
                counts.append(take)
                prefilling.append((s, take))
                computing.update(s.prompt_hashes[-(-s.fed // BLOCK) : (s.fed + take) // BLOCK])
                room -= take
        if not caches:
            return
        logits = self._model(torch.tensor(ids, dtype=torch.long, device=self._device),
                             caches, counts)
        self.stats.steps += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(caches))
        self.stats.batch_sizes[len(caches)] += 1
        for row, s in enumerate(decoding):
            s.pending = None
            self._prefix.register(s)
            self._advance_or_fail(s, logits[row])
        for row, (s, take) in enumerate(prefilling, start=len(decoding)):
            s.fed += take
            self._prefix.register(s)
            if s.fed == len(s.prompt):
                s.prefilled = time.perf_counter()
                self._advance_or_fail(s, logits[row])

    def _advance_or_fail(self, s: _Sequence, logits: torch.Tensor) -> None:
        """`_advance`, failing only ``s`` if its own sampling or text handling fails."""
        try:
            self._advance(s, logits)
        except Exception as exc:  # reported to that sequence alone
            log.exception("a sequence failed while sampling; the others go on")
            if s in self._active:
                self._active.remove(s)
            self._prefix.discard(s)
            _emit(s, exc)

    def _advance(self, s: _Sequence, logits: torch.Tensor) -> None:
        """Sample ``s``'s next token and report it (or finish)."""
        token = s.sampler.sample(logits)
        if token in self._stop_ids:
            self._finish(s, "stop")
            return
        s.generated += 1
        s.sampler.record(token)
        text, matched = s.stopper.push(s.detokenizer.push(token))
        _emit(s, Step(token, text))
        if matched is not None:
            self._finish(s, "stop", matched=matched)
        elif s.generated >= s.budget:
            self._finish(s, "length")
        else:
            s.pending = token

    def _finish(self, s: _Sequence, reason: FinishReason, *, matched: str | None = None) -> None:
        self._active.remove(s)
        self._prefix.retire(s)
        tail = ""
        if matched is None:
            tail, matched = s.stopper.push(s.detokenizer.flush())
            if matched is None:
                tail += s.stopper.flush()
            else:
                reason = "stop"
        now = time.perf_counter()
        prefilled = s.prefilled or now
        _emit(s, Finish(reason=reason, completion_tokens=s.generated, text=tail,
                      stop_sequence=matched, prefill_seconds=prefilled - s.started,
                      decode_seconds=now - prefilled))


def _reserve(s: _Sequence, count: int) -> None:
    """Make room in ``s``'s cache for ``count`` more positions (doubling it when full, up to
    what the sequence can ever need)."""
    cache = s.cache
    if cache.length + count > cache.capacity:
        cache.grow(min(max(cache.length + count, 2 * cache.capacity), len(s.prompt) + s.budget))


def _emit(s: _Submitted | _Sequence, item: Started | Step | Finish | BaseException) -> None:
    """Hand ``item`` to its sequence's listener; a listener that fails (its event loop is gone)
    cancels its own sequence and never stops the loop for the others."""
    try:
        s.emit(item)
    except Exception:  # logged; the sequence is cancelled at the next step
        log.exception("a sequence's listener failed; cancelling that sequence")
        s.cancelled.set()
