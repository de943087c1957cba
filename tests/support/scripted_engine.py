"""A scripted engine behind our own `Engine` interface, for tests that need exact, controllable
output (stream ordering, cancellation timing, failures). Everything else uses the real torch
engine on a tiny model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from neuron.engines.base import (
    Finish,
    GenerationParams,
    ModelFiles,
    ModelInfo,
    ProgressCallback,
    Step,
    TemplateMessage,
    TemplateValue,
)
from neuron.errors import ChatTemplateError


@dataclass
class Script:
    """What the scripted model says, and how."""

    words: tuple[str, ...] = ("Hello", " from", " the", " scripted", " model", ".")
    token_delay_s: float = 0.0
    fail_after: int | None = None
    """Raise RuntimeError after this many tokens."""
    context_length: int = 64
    load_delay_s: float = 0.0


@dataclass
class ScriptedModel:
    files: ModelFiles
    script: Script
    closed: bool = False
    generations: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.files.model_id, engine="scripted", format=self.files.format,
            architecture="scripted", context_length=self.script.context_length, vocab_size=100,
            parameters=0, memory_bytes=0, device="cpu", dtype="none",
        )

    def render_chat(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        template_kwargs: Mapping[str, TemplateValue] | None = None,
    ) -> str:
        if messages and messages[0]["role"] == "assistant":
            raise ChatTemplateError("conversation must not start with the assistant")
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]

    def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams, cancelled: threading.Event
    ) -> Iterator[Step | Finish]:
        self.generations.append(tuple(prompt_ids))
        produced = 0
        for i, word in enumerate(self.script.words):
            if cancelled.is_set():
                yield Finish(reason="cancelled", completion_tokens=produced)
                return
            if produced >= params.max_tokens:
                yield Finish(reason="length", completion_tokens=produced)
                return
            if self.script.fail_after is not None and i >= self.script.fail_after:
                raise RuntimeError("scripted device failure")
            if self.script.token_delay_s:
                time.sleep(self.script.token_delay_s)
            produced += 1
            yield Step(token_id=i, text=word)
        yield Finish(reason="stop", completion_tokens=produced)

    def close(self) -> None:
        self.closed = True


class ScriptedEngine:
    """Loads any path as a `ScriptedModel` following ``script``."""

    name = "torch"  # answers load requests for the default harness

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.loaded: list[ScriptedModel] = []

    def load(self, files: ModelFiles, progress: ProgressCallback) -> ScriptedModel:
        for step in range(1, 5):
            if self.script.load_delay_s:
                time.sleep(self.script.load_delay_s / 4)
            progress(step / 4, f"tensor {step}/4")
        model = ScriptedModel(files=files, script=self.script)
        self.loaded.append(model)
        return model
