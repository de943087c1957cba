"""Error codes that cross the bus. The gateway maps each one to an HTTP status and to each API
dialect's error body in a single table (`cortex.errors`)."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Why a job or control request failed, as carried in `JobFailed.code` and control replies."""

    INVALID_REQUEST = "invalid_request"
    """The job itself is malformed (a gateway bug or an old gateway)."""
    PROMPT_TOO_LONG = "prompt_too_long"
    MODEL_NOT_LOADED = "model_not_loaded"
    """The neuron does not hold the model (it was unloaded after the job was routed)."""
    OVERLOADED = "overloaded"
    """The neuron's admission limit is reached; retry elsewhere or later."""
    INSUFFICIENT_MEMORY = "insufficient_vram"
    TEMPLATE_ERROR = "template_error"
    """The chat template refused the messages (e.g. roles out of order)."""
    ENGINE_ERROR = "engine_error"
    """The model failed while generating."""
    LOAD_FAILED = "load_failed"
    UNSUPPORTED_ARCHITECTURE = "unsupported_architecture"
    NOT_FOUND = "not_found"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    SHUTTING_DOWN = "shutting_down"
    PREFLIGHT_FAILED = "preflight_failed"
    """A load refused before any download; the reply's ``preflight`` says why."""
    PINNED = "pinned"
    """An eviction of a model pinned on the node."""
