"""Incremental detokenisation and stop strings."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuron.text.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer, StopMatcher
from neuron.text.tokenizer import Tokenizer
from tests.support.tiny_models import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(train_tokenizer())


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer.decode)
    return [detok.push(i) for i in ids] + [detok.flush()]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_incremental_text_equals_full_decode_for_random_ids(
    tokenizer: Tokenizer, data: st.DataObject
) -> None:
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=40))
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_valid_text_never_yields_a_partial_character(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    if REPLACEMENT_CHAR not in text:
        assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_multibyte_character_split_over_byte_tokens_comes_out_whole(
    tokenizer: Tokenizer,
) -> None:
    ids = tokenizer.encode("🚀")
    assert len(ids) > 1  # the tiny byte-level vocabulary has no token for it
    pieces = stream(tokenizer, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1)
    assert pieces[-2] == "🚀"
    assert pieces[-1] == ""


def test_flush_releases_an_incomplete_character_as_replacement(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a🚀")
    detok = IncrementalDetokenizer(tokenizer.decode)
    released = [detok.push(i) for i in ids[:-1]]
    assert "".join(released) == "a"
    assert detok.flush() == REPLACEMENT_CHAR


def run_matcher(stops: list[str], chunks: list[str]) -> tuple[str, str | None, str]:
    matcher = StopMatcher(stops)
    out: list[str] = []
    matched: str | None = None
    for chunk in chunks:
        text, hit = matcher.push(chunk)
        out.append(text)
        if hit is not None:
            matched = hit
            break
    return "".join(out), matched, matcher.flush()


def test_stop_split_across_chunks_is_cut_and_reported() -> None:
    assert run_matcher(["STOP"], ["Hello S", "T", "OP and more"]) == ("Hello ", "STOP", "")


def test_text_that_could_start_a_stop_is_held_back_then_released() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.push("a </an") == ("a ", None)
    assert matcher.push("other") == ("</another", None)
    assert matcher.push("</") == ("", None)
    assert matcher.flush() == "</"


def test_stop_at_the_very_start() -> None:
    assert run_matcher(["Hi"], ["Hi there"]) == ("", "Hi", "")


def test_first_completed_stop_wins_among_overlapping_candidates() -> None:
    # "bc" completes (at index 3) before "abcd" would (index 4).
    assert run_matcher(["abcd", "bc"], ["xabcd"]) == ("xa", "bc", "")
    # Same end: the earlier (longer) one wins.
    assert run_matcher(["bc", "abc"], ["xabc"]) == ("x", "abc", "")
    # Streamed char by char, the same answers.
    assert run_matcher(["abcd", "bc"], list("xabcd")) == ("xa", "bc", "")


def test_repeated_prefix_characters_are_not_lost() -> None:
    assert run_matcher(["aab"], ["a", "a", "a", "b"]) == ("a", "aab", "")
    assert run_matcher(["aab"], list("aaac")) == ("aaac", None, "")


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.push("anything") == ("anything", None)
    assert matcher.flush() == ""


def test_pushes_after_a_match_release_nothing() -> None:
    matcher = StopMatcher(["x"])
    assert matcher.push("axb") == ("a", "x")
    assert matcher.push("more") == ("", None)
    assert matcher.matched == "x"
    assert matcher.flush() == ""


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_streamed_matching_equals_matching_the_whole_text(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    chunks = [text[a:b] for a, b in pairwise(bounds)]
    released, matched, tail = run_matcher(stops, chunks)
    # Reference: the first position where any stop string is complete.
    ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if ends:
        end, _, stop = min(ends)
        assert matched == stop
        assert released == text[: end - len(stop)]
        assert tail == ""
    else:
        assert matched is None
        assert released + tail == text
