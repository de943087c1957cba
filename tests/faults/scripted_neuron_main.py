"""A neuron as a real process running the counting scripted engine, for the soak tests:
``python -m tests.faults.scripted_neuron_main SPEC`` (SPEC as for `tests.faults.neuron_main`).

The counting model answers every prompt with `word` ``(tag, 0)``, ``(tag, 1)``, … until
``max_tokens`` (finish reason ``length``) or a cancel, at once (no delay), where ``tag`` is the
``[soak:<tag>]`` marker in the prompt: the text of every stream is known in advance and differs
between requests, so a lost, duplicated, reordered or misrouted token shows in the text. Its
prompt tokens are the characters of the rendered prompt (`prompt_tokens`). Each token is its own
`TokenChunk` (``chunk_max_tokens=1``), so a stream has as many ``seq`` numbers as tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Final

from neuron.engines.base import Finish, GenerationParams, ModelFiles, ProgressCallback, Step
from tests.faults.neuron_main import serve, settings_from
from tests.support.scripted_engine import Script, ScriptedEngine, ScriptedModel

_TAG: Final = re.compile(r"\[soak:([A-Za-z0-9_-]+)\]")
CONTEXT: Final = 1 << 24
"""The counting model's context length: room for the slow-client test's endless generation."""


def word(tag: str, index: int) -> str:
    """The ``index``-th token's text of the answer to the prompt tagged ``tag``."""
    return f" {tag}.{index}"


def expected_text(tag: str, tokens: int) -> str:
    return "".join(word(tag, i) for i in range(tokens))


def prompt_tokens(content: str) -> int:
    """Prompt tokens of a one-message chat whose user content is ``content``."""
    return len(f"<user> {content} <assistant>")


class CountingModel(ScriptedModel):
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams, cancelled: threading.Event
    ) -> Iterator[Step | Finish]:
        found = _TAG.search("".join(map(chr, prompt_ids)))
        tag = found.group(1) if found else "untagged"
        for index in range(params.max_tokens):
            if cancelled.is_set():
                yield Finish(reason="cancelled", completion_tokens=index)
                return
            yield Step(token_id=index, text=word(tag, index))
        yield Finish(reason="length", completion_tokens=params.max_tokens)


class CountingEngine(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__(Script(context_length=CONTEXT))

    def load(self, files: ModelFiles, progress: ProgressCallback) -> CountingModel:
        progress(1.0, "counting")
        return CountingModel(files=files, script=self.script)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = dataclasses.replace(settings_from(sys.argv[1]), chunk_max_tokens=1,
                                   max_waiting=64, max_prompt_tokens=4096)
    asyncio.run(serve(settings, CountingEngine()))


if __name__ == "__main__":
    main()
