"""Bad bus messages: dropped, counted, and logged without flooding the log.

Anything read from the bus is untrusted. A message that does not decode, or that contradicts its
subject, is dropped by whoever received it (gateway or neuron), never answered with a crash or a
disconnect. `Drops` counts them by kind and logs at most one line per kind every `interval_s`,
with how many were dropped since the previous line; subjects and reasons are shortened before
they reach the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

#: Longest subject or reason written to a log line.
_SHOWN: Final = 160


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else f"{text[:_SHOWN]}…")


class Drops:
    """Dropped messages by kind (see the module docstring). Event-loop only."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    @property
    def total(self) -> int:
        """Messages dropped since start."""
        return sum(self._counts.values())

    @property
    def by_kind(self) -> Mapping[str, int]:
        return dict(self._counts)

    def drop(self, kind: str, subject: str, reason: str) -> None:
        """Count one dropped message of ``kind`` (a fixed word chosen by the caller, never from
        the message) received on ``subject`` for ``reason``; log it unless ``kind`` was logged
        less than `interval_s` ago."""
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now = self._clock()
        last = self._logged_at.get(kind)
        if last is not None and now - last < self._interval_s:
            return
        count = self._unlogged.pop(kind)
        self._logged_at[kind] = now
        also = f" ({count} {kind} messages dropped since the last report)" if count > 1 else ""
        self._log.warning("dropped a %s message on %s: %s%s", kind, _shown(subject),
                          _shown(reason), also)
