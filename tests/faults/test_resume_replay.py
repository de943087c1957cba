"""Resuming a generation at any token gives the answer an uninterrupted run gives: what the first
neuron delivered plus what the second sends after replaying the delivered tokens
(`neuron.resume`) is, piece for piece, the uninterrupted output — with UTF-8 characters split
across tokens, stop strings and markers held back across the resumption point, reasoning and tool
calls in progress."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from neuron.engines.base import Finish, FinishReason
from neuron.output_router import OutputRouter, Piece, ReasoningPiece, TextPiece, ToolCallPiece
from neuron.resume import ResumedText
from neuron.text.detokenize import IncrementalDetokenizer, StopMatcher

#: A byte-level vocabulary: each id is a few bytes, some of them half a UTF-8 character.
PIECES: tuple[bytes, ...] = (
    b"Hel", b"lo", b" w", b"or", b"ld", b"<th", b"ink>", b"hm", b"m ", b"</", b"think>",
    b"\n\n", b"caf", b"\xc3", b"\xa9", b" \xf0\x9f", b"\x99", b"\x82", b"<tool", b"_call>",
    b'{"name": "f", ', b'"arguments": {"x": 1}}', b"</tool_call>", b" ST", b"OP", b" end",
    b" ", b"\xe6\x97", b"\xa5",
)


def decode(ids: Sequence[int]) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def ids_of(*pieces: bytes) -> list[int]:
    return [PIECES.index(p) for p in pieces]


ANSWERS = {
    "reasoning then text": ids_of(b"<th", b"ink>", b"hm", b"m ", b"\xe6\x97", b"\xa5", b"</",
                                  b"think>", b"\n\n", b"Hel", b"lo", b" w", b"or", b"ld"),
    "split characters": ids_of(b"caf", b"\xc3", b"\xa9", b" \xf0\x9f", b"\x99", b"\x82", b" ",
                               b"\xe6\x97", b"\xa5", b"Hel", b"lo"),
    "tool call": ids_of(b"Hel", b"lo", b"<tool", b"_call>", b'{"name": "f", ',
                        b'"arguments": {"x": 1}}', b"</tool_call>", b" ", b"<tool", b"_call>",
                        b'{"name": "f", ', b'"arguments": {"x": 1}}', b"</tool_call>", b" end"),
    "stop string": ids_of(b"Hel", b"lo", b" ST", b"OP", b" end"),
    "other stop string": ids_of(b"Hel", b" ST", b"lo", b" ST", b" ", b"OP"),
}
STOPS = ("STOP", "lo ST ")


class _Neuron:
    """The runner's text path for one generation: detokenizer, stop matcher, output router."""

    def __init__(self, *, tools: bool, resumed: Sequence[int] | None = None) -> None:
        self.router = OutputRouter(parse_tools=tools)
        self.resumed = None if resumed is None else ResumedText(decode, STOPS, resumed)
        self._detokenizer = IncrementalDetokenizer(decode)
        self._stopper = StopMatcher(STOPS)
        self.matched: str | None = None
        if self.resumed is not None:
            for text in self.resumed.replay():
                if text:
                    self.router.replay(text)

    def step(self, token_id: int) -> list[Piece]:
        if self.resumed is not None:
            text = self.resumed.step(token_id)
            if text is None:
                return []
        else:
            text, self.matched = self._stopper.push(self._detokenizer.push(token_id))
        return self.router.push(text) if text else []

    @property
    def stopped(self) -> bool:
        return (self.resumed.matched if self.resumed is not None else self.matched) is not None

    def finish(self, generated: int) -> tuple[list[Piece], Finish]:
        done = Finish(reason="length", completion_tokens=generated)
        if self.resumed is not None:
            tail, done = self.resumed.finish(done)
        elif self.matched is None:
            tail = self._stopper.push(self._detokenizer.flush())[0] + self._stopper.flush()
        else:
            tail, done = "", Finish(reason="stop", completion_tokens=generated,
                                    stop_sequence=self.matched)
        return (self.router.push(tail) if tail else []) + self.router.flush(), done


def _shape(pieces: list[Piece]) -> tuple[str, str, list[tuple[int, str, str]]]:
    """Text, reasoning and tool calls (call ids are random per router)."""
    return ("".join(p.text for p in pieces if isinstance(p, TextPiece)),
            "".join(p.text for p in pieces if isinstance(p, ReasoningPiece)),
            [(p.index, p.name, p.arguments) for p in pieces if isinstance(p, ToolCallPiece)])


def _uninterrupted(ids: list[int], tools: bool) -> tuple[list[Piece], list[Piece], Finish]:
    """Per-token pieces of the whole run (up to a stop), then the end's pieces and finish."""
    neuron = _Neuron(tools=tools)
    per_token: list[Piece] = []
    generated = 0
    for token_id in ids:
        per_token += neuron.step(token_id)
        generated += 1
        if neuron.stopped:
            break
    tail, done = neuron.finish(generated)
    return per_token, tail, done


@pytest.mark.parametrize("tools", [False, True], ids=["no tools", "tools"])
@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_resuming_at_every_token_gives_the_uninterrupted_answer(name: str, tools: bool) -> None:
    ids = ANSWERS[name]
    _, _, whole_done = _uninterrupted(ids, tools)
    per_token, tail, _ = _uninterrupted(ids, tools)
    expected = _shape(per_token + tail)
    stopped_at = whole_done.completion_tokens  # tokens after a stop are never generated
    for k in range(stopped_at + 1):
        delivered = _Neuron(tools=tools)
        sent: list[Piece] = []
        for token_id in ids[:k]:
            sent += delivered.step(token_id)
        resumed = _Neuron(tools=tools, resumed=ids[:k])
        for token_id in ids[k:stopped_at]:
            sent += resumed.step(token_id)
        end, done = resumed.finish(stopped_at - k)
        assert _shape(sent + end) == expected, f"resumed after {k} tokens"
        assert (done.reason, done.completion_tokens, done.stop_sequence) == (
            whole_done.reason, whole_done.completion_tokens, whole_done.stop_sequence), k


def test_the_answers_cover_what_resuming_must_preserve() -> None:
    """The cases above are not vacuous: each holds something back across some token."""
    per_token, _, done = _uninterrupted(ANSWERS["stop string"], tools=False)
    assert (done.stop_sequence, _shape(per_token)[0]) == ("STOP", "Hello ")  # "lo ST" held
    per_token, _, done = _uninterrupted(ANSWERS["other stop string"], tools=False)
    assert (done.stop_sequence, _shape(per_token)[0]) == ("lo ST ", "Hel ST")
    per_token, _, _ = _uninterrupted(ANSWERS["tool call"], tools=True)
    assert [p.index for p in per_token if isinstance(p, ToolCallPiece)] == [0, 1]
    assert decode(ids_of(b"\xe6\x97")) == "\ufffd"  # half a character on its own


def test_a_continuation_reports_the_resumed_tokens_and_its_engines_reason() -> None:
    resumed = ResumedText(decode, (), ids_of(b"Hel", b"lo"))
    assert list(resumed.replay()) == ["Hel", "lo"]
    assert resumed.step(PIECES.index(b" w")) == " w"
    reason: FinishReason = "cancelled"
    tail, done = resumed.finish(Finish(reason=reason, completion_tokens=1))
    assert (tail, done.reason, done.completion_tokens) == ("", "cancelled", 3)


def test_a_stop_string_the_engine_cannot_see_ends_the_continuation() -> None:
    """``lo ST `` spans the resumption point: the engine's own matcher starts empty after it,
    the replayed one holds ``lo ST`` and completes the match on the next token."""
    resumed = ResumedText(decode, STOPS, ids_of(b"Hel", b"lo", b" ST"))
    assert "".join(resumed.replay()) == "Hel"
    assert resumed.step(PIECES.index(b" ")) == ""
    assert resumed.matched == "lo ST "
    assert resumed.step(PIECES.index(b" end")) is None  # the engine is being stopped
    _, done = resumed.finish(Finish(reason="cancelled", completion_tokens=2))
    assert (done.reason, done.stop_sequence, done.completion_tokens) == ("stop", "lo ST ", 4)
