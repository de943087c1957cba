"""The contract between the neuron's job runner and an inference engine.

An engine turns a model on disk into a `LoadedModel`. A `LoadedModel` is used from exactly one
thread (the model's own executor thread): rendering the chat template and encoding may also be
called from other threads, so they must not touch mutable model state.

Nothing in this module imports torch: the worker can be type-checked and tested without it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, Protocol, runtime_checkable

from neuron.text.chat_template import TemplateMessage, TemplateValue

ModelFormat = Literal["safetensors", "gguf"]
FinishReason = Literal["stop", "length", "cancelled"]

#: Called with a fraction in [0, 1] and a short description while a model loads.
ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True, kw_only=True)
class ModelFiles:
    """Where a model's files are on local disk, as resolved by `neuron.sources`."""

    model_id: str
    """Canonical bare id (``org/name``) the model is served under."""
    format: ModelFormat
    weights: tuple[Path, ...]
    """safetensors shards, or exactly one ``.gguf`` file."""
    config: Path | None = None
    """``config.json`` (dense models)."""
    tokenizer: Path | None = None
    """``tokenizer.json``; for GGUF the tokenizer may come from the file's metadata instead."""
    tokenizer_config: Path | None = None
    chat_template: Path | None = None
    """``chat_template.jinja``."""
    generation_config: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Facts about a loaded model, reported in heartbeats and `/v1/models`."""

    model_id: str
    engine: str
    format: ModelFormat
    architecture: str
    context_length: int
    vocab_size: int
    parameters: int
    memory_bytes: int
    """Bytes the resident weights take on their device."""
    device: str
    """``cpu`` or ``cuda:N``."""
    dtype: str


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """Sampling and stopping for one generation. Validated by the gateway before it is sent."""

    max_tokens: int
    temperature: float = 0.7
    """``<= 0`` means greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Stop strings: output is cut before the first match, which is not emitted."""
    repetition_penalty: float = 1.0
    repetition_window: int = 64
    """How many of the most recent generated tokens the repetition penalty looks at."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    history: tuple[int, ...] = ()
    """Tokens this generation produced before this call (a generation resumed after a failover,
    already at the end of the prompt): the penalties count them as generated, so a resumed
    greedy generation picks what the uninterrupted one would."""


@dataclass(frozen=True, slots=True)
class Step:
    """One generated token and the text it releases (may be ``""`` while text is held back,
    e.g. an incomplete UTF-8 sequence or a possible start of a stop string)."""

    token_id: int
    text: str


@dataclass(frozen=True, kw_only=True)
class Finish:
    """The last item of a generation."""

    reason: FinishReason
    completion_tokens: int
    text: str = ""
    """Held-back text released at the end (empty when a stop string matched)."""
    stop_sequence: str | None = None
    """The stop string that ended generation, if any."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class PromptPlan:
    """A rendered, tokenised prompt."""

    text: str
    token_ids: tuple[int, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Started:
    """A submitted sequence joined its model's running batch (it stops waiting)."""


STARTED: Final = Started()
#: Receives a submitted sequence's progress on the engine's thread: `STARTED` once, then `Step`s,
#: then exactly one `Finish` or the exception that ended it.
Emit = Callable[[Started | Step | Finish | BaseException], None]


class LoadedModel(Protocol):
    """A model resident on a device, ready to generate."""

    @property
    def info(self) -> ModelInfo: ...

    def render_chat(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        template_kwargs: Mapping[str, TemplateValue] | None = None,
    ) -> str:
        """Render the model's chat template with ``add_generation_prompt=True``.

        Raises:
            ChatTemplateError: the template failed to render these messages.
        """
        ...

    def encode(self, text: str) -> list[int]:
        """Tokenise rendered text without adding special tokens again."""
        ...

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        cancelled: threading.Event,
    ) -> Iterator[Step | Finish]:
        """Generate from ``prompt_ids``; blocking; call on the model's thread.

        Yields one `Step` per sampled token (stop tokens are never yielded) and ends with exactly
        one `Finish`. Checks ``cancelled`` between steps and finishes with reason ``cancelled``.
        Generation never exceeds ``params.max_tokens`` nor the model's context length (``length``).
        """
        ...

    def close(self) -> None:
        """Release the weights (and device memory)."""
        ...


@runtime_checkable
class BatchingModel(Protocol):
    """A model that runs many sequences at once (continuous batching): the neuron submits each
    job's sequence and its engine-owned step loop reports progress through ``emit``."""

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        cancelled: threading.Event,
        emit: Emit,
    ) -> None:
        """Queue a sequence; returns at once. ``emit`` is called on the engine's thread.

        Raises:
            ValueError: an empty prompt, or ids outside the vocabulary.
            ModelNotLoadedError: after `close`.
        """
        ...


class Engine(Protocol):
    """Loads models of the formats it supports."""

    name: str

    def load(self, files: ModelFiles, progress: ProgressCallback) -> LoadedModel:
        """Load weights and tokenizer; blocking; reports progress in [0, 1].

        Raises:
            ModelLoadError: the files are missing, malformed or of an unsupported architecture.
        """
        ...
