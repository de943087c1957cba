"""The neuron's error tree. Engine and library errors are translated into these once, where they
happen (in `neuron.engines` and `neuron.sources`); the job runner maps them to bus error codes."""

from __future__ import annotations


class NeuronError(Exception):
    """Root of every error the neuron raises on purpose."""


class ModelSourceError(NeuronError):
    """A model id or path could not be resolved to files on local disk."""


class ModelLoadError(NeuronError):
    """Weights, config or tokenizer could not be loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """The engine cannot run this architecture (refused before loading, never a crash)."""

    def __init__(self, architecture: str, engine: str, detail: str = "") -> None:
        self.architecture = architecture
        self.engine = engine
        msg = f"architecture '{architecture}' is not supported by the {engine} engine"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class ChatTemplateError(NeuronError):
    """The chat template failed to render the request's messages."""


class ModelNotLoadedError(NeuronError):
    """A job or control request named a model this neuron does not hold."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        super().__init__(f"model '{model_id}' not loaded on this neuron")


class InsufficientMemoryError(NeuronError):
    """A load does not fit the device's memory budget (refused before reading weights)."""

    def __init__(self, message: str, *, need_mb: int) -> None:
        self.need_mb = need_mb
        super().__init__(message)


class AlreadyLoadedError(NeuronError):
    """A load of a model this neuron already holds (the reference's wording; callers treat it as
    success)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        super().__init__(f"model '{model_id}' already loaded")
