"""A scripted engine behind our own `Engine` interface, for tests that need exact, controllable
output (stream ordering, cancellation timing, failures). Everything else uses the real torch
engine on a tiny model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from neuron.engines.base import (
    Finish,
    GenerationParams,
    ModelFiles,
    ModelInfo,
    ProgressCallback,
    Step,
)
from neuron.errors import ChatTemplateError
from neuron.text.chat_template import TemplateMessage, TemplateValue


@dataclass
class Script:
    """What the scripted model says, and how."""

    words: tuple[str, ...] = ("Hello", " from", " the", " scripted", " model", ".")
    token_delay_s: float = 0.0
    fail_after: int | None = None
    """Raise RuntimeError after this many tokens."""
    context_length: int = 64
    load_delay_s: float = 0.0
    reply: Callable[[str], Sequence[str]] | None = None
    """Words to say given the rendered prompt (overrides ``words``): a model that answers a tool
    result differently from a question."""


@dataclass
class ScriptedModel:
    files: ModelFiles
    script: Script
    closed: bool = False
    generations: list[tuple[int, ...]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    last_rendered: str = ""

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
        rendered = " ".join(f"<{m['role']}> {m['content']}" for m in messages)
        for message in messages:
            for call in message.get("tool_calls") or ():  # type: ignore[attr-defined]
                rendered += f" <call> {json.dumps(call, sort_keys=True)}"
        if tools:
            rendered = f"<tools> {json.dumps(list(tools), sort_keys=True)} {rendered}"
        if template_kwargs and template_kwargs.get("enable_thinking") is False:
            rendered += " <no_think>"
        return rendered + " <assistant>"

    def encode(self, text: str) -> list[int]:
        self.last_rendered = text
        return [len(word) for word in text.split()]

    def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams, cancelled: threading.Event
    ) -> Iterator[Step | Finish]:
        self.generations.append(tuple(prompt_ids))
        self.prompts.append(self.last_rendered)
        produced = 0
        words = self.script.words
        if self.script.reply is not None:
            words = tuple(self.script.reply(self.last_rendered))
        for i, word in enumerate(words):
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
