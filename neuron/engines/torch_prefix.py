"""Prefix reuse for the torch step loop: a prompt that starts like a sequence already computed
(the same system prompt, tools and earlier turns of a conversation; the same prompt sent twice)
copies those positions of its KV cache instead of computing them again.

Token prefixes are indexed by blocks of `BLOCK` tokens, each named by a hash chained over every
block before it (as vLLM's automatic prefix caching does), so one dictionary lookup per block
finds the longest cached prefix. A block is registered once a sequence's cache holds it; the
owner of a block holds every block before it too. Hashes are checked against the owner's tokens
before a copy, so a collision costs a lookup, never wrong output.

Sequences keep their blocks while they run. Finished ones are retained, newest first, up to a
byte budget (``retain_bytes``; 0 keeps nothing once a sequence ends), then forgotten.

Positions copied from another sequence were computed in different pieces (another prompt
length, or a decode step instead of a prompt piece), so a sequence that reuses a prefix can
differ from a cold run in the last bits of its numbers, as with every prefix cache; greedy output
is the same in practice but not guaranteed bit for bit.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Final

from neuron.engines.torch_decoder import KVCache

#: Tokens per indexed block.
BLOCK: Final = 16


@dataclass(eq=False, kw_only=True)
class Cached:
    """A sequence's tokens and cache, as the index sees them."""

    tokens: list[int]
    """The tokens whose keys and values fill ``cache`` (``tokens[:cache.length]``), and more."""
    cache: KVCache
    hashes: list[int] = field(default_factory=list)
    """Chained hashes of the blocks registered so far."""


def block_hashes(tokens: list[int], *, limit: int | None = None) -> list[int]:
    """Chained hashes of the whole blocks of ``tokens`` (at most ``limit`` blocks)."""
    count = len(tokens) // BLOCK if limit is None else min(limit, len(tokens) // BLOCK)
    hashes: list[int] = []
    previous = 0
    for index in range(count):
        previous = hash((previous, *tokens[index * BLOCK : (index + 1) * BLOCK]))
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """Which caches hold which token prefixes (see the module docstring). One step loop owns it;
    not thread-safe."""

    def __init__(self, *, retain_bytes: int) -> None:
        if retain_bytes < 0:
            raise ValueError("retain_bytes must be >= 0")
        self._owners: dict[int, Cached] = {}
        self._retained: collections.OrderedDict[int, Cached] = collections.OrderedDict()
        self._retain_bytes = retain_bytes
        self.retained_bytes = 0
        self.reused_tokens = 0
        """Prompt tokens copied instead of computed, since start."""

    def register(self, entry: Cached) -> None:
        """Index every whole block that ``entry``'s cache now holds."""
        filled = entry.cache.length
        while (len(entry.hashes) + 1) * BLOCK <= filled:
            index = len(entry.hashes)
            previous = entry.hashes[-1] if entry.hashes else 0
            digest = hash((previous, *entry.tokens[index * BLOCK : (index + 1) * BLOCK]))
            entry.hashes.append(digest)
            self._owners[digest] = entry

    def adopt(self, entry: Cached, prompt_hashes: list[int], *, upto: int) -> int:
        """Copy into ``entry``'s cache the longest indexed prefix of its tokens beyond what it
        holds, stopping at ``upto`` tokens; returns how many positions were copied.

        ``entry.cache.length`` must be a multiple of `BLOCK`; ``prompt_hashes`` are
        `block_hashes` of ``entry.tokens``.
        """
        have = entry.cache.length
        blocks = min(len(prompt_hashes), upto // BLOCK)
        owner: Cached | None = None
        depth = have // BLOCK
        while depth < blocks:
            found = self._owners.get(prompt_hashes[depth])
            if found is None or found is entry:
                break
            owner, depth = found, depth + 1
        if owner is None:
            return 0
        end = depth * BLOCK
        if owner.cache.length < end or owner.tokens[:end] != entry.tokens[:end]:
            return 0  # a hash collision, or an owner that no longer holds the block
        cache, source = entry.cache, owner.cache
        cache.k[:, :, have:end] = source.k[:, :, have:end]
        cache.v[:, :, have:end] = source.v[:, :, have:end]
        cache.length = end
        self.reused_tokens += end - have
        return end - have

    def retire(self, entry: Cached) -> None:
        """``entry`` stopped running: keep its blocks while the budget allows, newest first."""
        size = entry.cache.nbytes
        if not entry.hashes or size > self._retain_bytes:
            self._forget(entry)
            return
        self._retained[id(entry)] = entry
        self.retained_bytes += size
        while self.retained_bytes > self._retain_bytes:
            _, oldest = self._retained.popitem(last=False)
            self.retained_bytes -= oldest.cache.nbytes
            self._forget(oldest)

    def discard(self, entry: Cached) -> None:
        """Forget ``entry``'s blocks now (its cache is not to be trusted)."""
        self._forget(entry)

    def clear(self) -> None:
        """Forget everything (the model is closing)."""
        self._owners.clear()
        self._retained.clear()
        self.retained_bytes = 0

    def _forget(self, entry: Cached) -> None:
        for digest in entry.hashes:
            if self._owners.get(digest) is entry:
                del self._owners[digest]
        entry.hashes.clear()
