"""Streaming text out of generated ids: incremental detokenisation and stop strings.

`IncrementalDetokenizer` releases text as ids arrive without ever splitting a UTF-8 character
(the prefix_offset / read_offset scheme of TGI and vLLM). `StopMatcher` holds back any tail that
could start a stop string and cuts the output before the first match (REFERENCE §6.3).

This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

#: What lossy UTF-8 decoding puts where a character is (still) incomplete.
REPLACEMENT_CHAR: Final = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of ids into a stream of text pieces.

    Each `push` decodes only a short window of recent ids: the text of ``ids[prefix:]`` minus the
    text of ``ids[prefix:read]``. While the window's text ends with U+FFFD (an incomplete
    multi-byte character), nothing is released; the character comes out whole once its last byte
    arrives. Decoding a window rather than single ids also keeps tokenizer-specific joins (e.g.
    SentencePiece leading spaces) right.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        """Create a detokenizer.

        Args:
            decode: decodes a list of ids to text (lossy: invalid UTF-8 becomes U+FFFD).
        """
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])

    def push(self, token_id: int) -> str:
        """Add one id; return the text it releases (possibly ``""``)."""
        self._ids.append(token_id)
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        released = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return released

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character comes out as U+FFFD)."""
        new_text = self._decode(self._ids[self._prefix_offset :])
        released = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return released


class StopMatcher:
    """Finds stop strings in streamed text.

    Text that could be the start of a stop string is held back until it either completes the stop
    string (then everything from the match on is dropped) or can no longer match (then it is
    released). When several stop strings match, the one that completes first in the stream wins.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        """Create a matcher for ``stops`` (empty strings are ignored)."""
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.matched: str | None = None
        """The stop string that matched, once one has."""

    def push(self, text: str) -> tuple[str, str | None]:
        """Add streamed text.

        Returns:
            The text that may be released now, and the stop string if one just matched (the
            released text then ends right before the match, and later pushes release nothing).
        """
        if self.matched is not None:
            return "", None
        if not self._stops:
            return text, None
        buffer = self._held + text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        if best is not None:
            _, start, stop = best
            self._held = ""
            self.matched = stop
            return buffer[:start], stop
        hold = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], None

    def flush(self) -> str:
        """Release the held-back tail (generation ended without completing a stop string)."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        for size in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
