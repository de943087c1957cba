"""Continuing a generation another neuron started (failover; `bus_schema.messages.ResumeState`).

The gateway sends the ids of every token its client already received. The runner appends them to
the prompt ids, so the engine continues right after them, and replays them here through a
detokenizer and a stop matcher (and, in the runner, the output router) exactly as the first neuron
ran them, without sending their output: held-back text (a possible stop string, a possible marker,
an incomplete UTF-8 character) and reasoning/tool-call mode are then the same as on that neuron,
and everything after the delivered tokens is sent exactly once.

The engines do their own detokenizing and stop matching, from a fresh state at the first new
token: for a resumed job the runner uses `ResumedText` instead (on the engine's thread) and ignores
the engine's text. Its stop matcher sees the text from before the resumption too, so it matches a
stop string no later than the engine's would; it then tells the engine to stop.

This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from neuron.engines.base import Finish, LoadedModel
from neuron.text.detokenize import IncrementalDetokenizer, StopMatcher

Decode = Callable[[Sequence[int]], str]


@runtime_checkable
class _Decodes(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


def id_decoder(model: LoadedModel) -> Decode | None:
    """How to turn ``model``'s ids into text outside its engine: its own ``decode`` or its
    tokenizer's (the one its engine detokenizes with). None when it has neither (such a model
    cannot resume a generation)."""
    if isinstance(model, _Decodes):
        return model.decode
    tokenizer = getattr(model, "tokenizer", None)
    if isinstance(tokenizer, _Decodes):
        return tokenizer.decode
    return None


class ResumedText:
    """Text of a resumed generation: the delivered tokens replayed, then the new ones.

    Use from one thread at a time: `replay` before the engine starts, then `step` for each new
    token and `finish` once, on the engine's thread.
    """

    def __init__(self, decode: Decode, stops: Sequence[str], delivered: Sequence[int]) -> None:
        self._detokenizer = IncrementalDetokenizer(decode)
        self._stopper = StopMatcher(stops)
        self._delivered = tuple(delivered)
        self.resumed = len(self._delivered)
        """How many delivered tokens the generation continues from."""
        self.generated = 0
        """New tokens taken (up to and including the one that completed a stop string)."""
        self.matched: str | None = None
        """The stop string that ended the generation, once one has."""

    def replay(self) -> Iterator[str]:
        """The text each delivered token released on the first neuron (for its output router),
        in order. Blocking, CPU-bound: run off the event loop. A stop string completed by the
        last delivered token (the first neuron died before it said so) sets `matched`."""
        for token_id in self._delivered:
            text, matched = self._stopper.push(self._detokenizer.push(token_id))
            yield text
            if matched is not None:
                self.matched = matched
                return

    def step(self, token_id: int) -> str | None:
        """The text a new token releases; None once a stop string matched (the token is not part
        of the answer: the engine is being stopped)."""
        if self.matched is not None:
            return None
        self.generated += 1
        text, matched = self._stopper.push(self._detokenizer.push(token_id))
        if matched is not None:
            self.matched = matched
        return text

    def finish(self, done: Finish) -> tuple[str, Finish]:
        """The held-back text released at the end, and the engine's `Finish` as the whole
        generation's: completion tokens include the resumed ones, and a stop string matched here
        is the reason (the engine itself saw ``cancelled``, since it was told to stop)."""
        tail = ""
        if self.matched is None and done.stop_sequence is None:
            tail, matched = self._stopper.push(self._detokenizer.flush())
            if matched is None:
                tail += self._stopper.flush()
            else:
                self.matched = matched
        if self.matched is not None:
            return tail, Finish(reason="stop", completion_tokens=self.resumed + self.generated,
                                stop_sequence=self.matched, prefill_seconds=done.prefill_seconds,
                                decode_seconds=done.decode_seconds)
        return tail, Finish(reason=done.reason,
                            completion_tokens=self.resumed + done.completion_tokens,
                            stop_sequence=done.stop_sequence,
                            prefill_seconds=done.prefill_seconds,
                            decode_seconds=done.decode_seconds)
