"""Routing generated text into content, reasoning and tool calls (REFERENCE §6.5).

`OutputRouter` takes the streamed text of one generation (already detokenised and cut at stop
strings, in arbitrary pieces) and splits it into `TextPiece`, `ReasoningPiece` and
`ToolCallPiece`. Markers may arrive split across pieces: only the shortest tail that could still
start a marker is held back, everything else is released at once.

* Reasoning markers (``<think>`` … ``</think>``) toggle reasoning mode and are never emitted. A
  stray closing marker outside reasoning is dropped too; an opening marker inside reasoning is
  dropped.
* Outside reasoning, text between ``<tool_call>`` and ``</tool_call>`` is buffered and parsed once
  the closing marker arrives: JSON ``{"name", "arguments"}`` (``"parameters"`` is an alias;
  arguments may be an object or a JSON string holding one), or the Qwen3-Coder form
  ``<function=NAME><parameter=P>V</parameter>…</function>`` with values coerced by the tool's JSON
  schema. Content that parses as neither comes out as text, markers included, with a warning.
* Tool-call arguments are always re-serialised as compact JSON
  (``json.dumps(obj, ensure_ascii=False, separators=(",", ":"))``); ``"{}"`` when absent.

Whitespace next to markers is tidied, never anything else:

* leading whitespace of a reasoning block is dropped (``"<think>\\nHmm"`` → ``"Hmm"``), trailing
  whitespace before ``</think>`` is kept (dropping it would mean holding text back);
* leading whitespace of the text after a closing reasoning marker (stray or not) is dropped
  (``"</think>\\n\\nHello"`` → ``"Hello"``);
* whitespace-only text after a tool call is held; it is dropped when another tool call or the
  end of the generation follows, and released with the text otherwise.

This module never imports torch.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias

log = logging.getLogger(__name__)

DEFAULT_REASONING_MARKERS: Final = ("<think>", "</think>")
DEFAULT_TOOL_MARKERS: Final = ("<tool_call>", "</tool_call>")

_FUNCTION_OPEN: Final = "<function="
_FUNCTION_CLOSE: Final = "</function>"
#: A parameter's value ends at ``</parameter>``, at the next ``<parameter=`` or at the end.
_PARAMETER: Final = re.compile(
    r"<parameter=([^>]*)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL
)
#: JSON-schema types whose values are parsed with `json.loads` in the ``<function=…>`` form.
_JSON_TYPES: Final = frozenset({"integer", "number", "boolean", "object", "array", "null"})


@dataclass(frozen=True, slots=True)
class TextPiece:
    """Answer text (the ``content`` of the message)."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningPiece:
    """Text between reasoning markers (``reasoning_content``)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallPiece:
    """One complete, parsed tool call."""

    index: int
    """0, 1, 2 … in order of appearance within the generation."""
    id: str
    """``call_<12 hex>_<index>``; the hex part is fixed per router."""
    name: str
    arguments: str
    """Compact JSON text of the arguments object (``"{}"`` when the call gave none)."""


Piece: TypeAlias = TextPiece | ReasoningPiece | ToolCallPiece


class _Mode(Enum):
    TEXT = "text"
    REASONING = "reasoning"
    TOOL = "tool"


class _MalformedToolCall(ValueError):
    """Tool-call content that is neither the JSON nor the ``<function=…>`` form."""


def prompt_opens_reasoning(
    prompt_text: str, markers: tuple[str, str] = DEFAULT_REASONING_MARKERS
) -> bool:
    """Whether the rendered prompt ends inside an open reasoning block: it ends with the opening
    marker (whitespace aside), as templates do that start the answer with ``"<think>\\n"``; the
    router should then start in reasoning mode.

    Only the end counts: a user who writes ``<think>`` in a message (and a template that then
    appends the assistant header) must not turn the whole answer into reasoning.
    """
    return bool(markers[0]) and prompt_text.rstrip().endswith(markers[0])


class OutputRouter:
    """Splits one generation's streamed text into typed pieces.

    Call `push` with each piece of text as it is released, then `flush` once at the end. Each call
    returns the pieces it completes, adjacent text or reasoning merged, never an empty one. Never
    raises on model output: malformed tool calls come out as text and are logged.
    """

    def __init__(
        self,
        *,
        start_in_reasoning: bool = False,
        tools: Sequence[Mapping[str, object]] | None = None,
        reasoning_markers: tuple[str, str] = DEFAULT_REASONING_MARKERS,
        tool_markers: tuple[str, str] = DEFAULT_TOOL_MARKERS,
        parse_tools: bool = True,
        job_id: str = "",
    ) -> None:
        """Create a router for one generation.

        Args:
            start_in_reasoning: the prompt already opened a reasoning block
                (see `prompt_opens_reasoning`).
            tools: the request's OpenAI-shaped tools
                (``{"type": "function", "function": {"name", "parameters"}}``); their parameter
                schemas coerce ``<function=…>`` values. Tool calls are parsed without them too.
            reasoning_markers: opening and closing reasoning markers.
            tool_markers: opening and closing tool-call markers.
            parse_tools: False leaves tool-call markup in the text (a request that offered no
                tools gets what the model wrote, as vLLM does).
            job_id: named in log lines.

        Raises:
            ValueError: a marker is empty.
        """
        if not all((*reasoning_markers, *tool_markers)):
            raise ValueError("output router markers must not be empty")
        self._think_open, self._think_close = reasoning_markers
        self._tool_open, self._tool_close = tool_markers
        self._job_id = job_id
        self._schemas = _parameter_schemas(tools or ())
        self._call_hex = secrets.token_hex(6)
        self._calls = 0
        self._markers: dict[_Mode, tuple[str, ...]] = {
            _Mode.TEXT: (self._think_open, self._think_close,
                         *((self._tool_open,) if parse_tools else ())),
            _Mode.REASONING: (self._think_open, self._think_close),
            _Mode.TOOL: (self._tool_close,),
        }
        self._prefixes = {
            mode: frozenset(m[:i] for m in markers for i in range(1, len(m)))
            for mode, markers in self._markers.items()
        }
        self._longest = {mode: max(map(len, ms)) for mode, ms in self._markers.items()}
        self._initials = {mode: frozenset(m[0] for m in ms) for mode, ms in self._markers.items()}
        self._mode = _Mode.REASONING if start_in_reasoning else _Mode.TEXT
        self._held = ""  # a tail that may start a marker of the current mode
        self._tool_text: list[str] = []  # content of the open tool call
        self._strip_reasoning = start_in_reasoning  # drop leading whitespace of reasoning
        self._strip_text = False  # drop leading whitespace of text (after a reasoning block)
        self._tool_gap: str | None = None  # whitespace held after a tool call

    @property
    def tool_calls(self) -> int:
        """How many `ToolCallPiece` were emitted so far."""
        return self._calls

    def push(self, text: str) -> list[Piece]:
        """Route the next piece of generated text; return the pieces it completes."""
        out: list[Piece] = []
        buffer = self._held + text if self._held else text
        self._held = ""
        pos = 0
        while True:
            markers = self._markers[self._mode]
            start, marker = _first_marker(buffer, pos, markers)
            if not marker:
                hold = self._hold_length(buffer, pos)
                end = len(buffer) - hold
                self._route(out, buffer[pos:end])
                self._held = buffer[end:]
                return out
            self._route(out, buffer[pos:start])
            pos = start + len(marker)
            self._on_marker(out, marker)

    def replay(self, text: str) -> None:
        """Route text whose output was already delivered (a resumed generation, see
        `neuron.resume`): the state advances exactly as `push` would advance it (held-back text,
        reasoning or tool-call mode, tool-call count), and nothing is returned."""
        self.push(text)

    def flush(self) -> list[Piece]:
        """End the generation: release held text and any unterminated tool call as text."""
        out: list[Piece] = []
        held, self._held = self._held, ""
        self._route(out, held)
        if self._mode is _Mode.TOOL:
            raw = self._tool_open + "".join(self._tool_text)
            self._tool_text.clear()
            log.warning("job=%s unterminated tool call; passed through as text", self._job_id)
            self._mode = _Mode.TEXT
            self._emit_text(out, raw)
        self._mode = _Mode.TEXT
        self._tool_gap = None  # whitespace after the last tool call is dropped
        return out

    # -- scanning ------------------------------------------------------------------------------

    def _hold_length(self, buffer: str, pos: int) -> int:
        """Length of the longest tail of ``buffer[pos:]`` that is a proper prefix of a marker."""
        size = min(len(buffer) - pos, self._longest[self._mode] - 1)
        if size <= 0:
            return 0
        window = buffer[len(buffer) - size :]
        if not any(c in window for c in self._initials[self._mode]):
            return 0
        prefixes = self._prefixes[self._mode]
        for length in range(size, 0, -1):
            if window[size - length :] in prefixes:
                return length
        return 0

    def _route(self, out: list[Piece], text: str) -> None:
        """Send text found between markers to the current mode."""
        if not text:
            return
        if self._mode is _Mode.TEXT:
            self._emit_text(out, text)
        elif self._mode is _Mode.REASONING:
            self._emit_reasoning(out, text)
        else:
            self._tool_text.append(text)

    def _on_marker(self, out: list[Piece], marker: str) -> None:
        """Act on a complete marker of the current mode."""
        if self._mode is _Mode.TOOL:  # the only marker here is the closing one
            content = "".join(self._tool_text)
            self._tool_text.clear()
            self._mode = _Mode.TEXT
            self._finish_tool_call(out, content)
        elif marker == self._think_open:
            if self._mode is _Mode.TEXT:
                self._mode = _Mode.REASONING
                self._strip_reasoning = True
                self._tool_gap = None
        elif marker == self._think_close:
            self._mode = _Mode.TEXT
            self._strip_text = True
        else:  # the tool-call opening marker, outside reasoning
            self._mode = _Mode.TOOL

    # -- emitting ------------------------------------------------------------------------------

    def _emit_text(self, out: list[Piece], text: str) -> None:
        if self._tool_gap is not None:
            if text.isspace():
                self._tool_gap += text
                return
            text, self._tool_gap = self._tool_gap + text, None
        if self._strip_text:
            text = text.lstrip()
            if not text:
                return
            self._strip_text = False
        if out and isinstance(out[-1], TextPiece):
            out[-1] = TextPiece(out[-1].text + text)
        else:
            out.append(TextPiece(text))

    def _emit_reasoning(self, out: list[Piece], text: str) -> None:
        if self._strip_reasoning:
            text = text.lstrip()
            if not text:
                return
            self._strip_reasoning = False
        if out and isinstance(out[-1], ReasoningPiece):
            out[-1] = ReasoningPiece(out[-1].text + text)
        else:
            out.append(ReasoningPiece(text))

    def _finish_tool_call(self, out: list[Piece], content: str) -> None:
        """Parse a complete tool call; emit it, or its raw text when malformed."""
        try:
            name, arguments = _parse_tool_call(content, self._schemas)
        except _MalformedToolCall as exc:
            log.warning(
                "job=%s malformed tool call (%s); passed through as text", self._job_id, exc
            )
            self._emit_text(out, self._tool_open + content + self._tool_close)
            return
        index = self._calls
        self._calls += 1
        out.append(ToolCallPiece(index, f"call_{self._call_hex}_{index}", name, arguments))
        self._tool_gap = ""  # whitespace between calls (or before the end) is dropped
        self._strip_text = False


def _first_marker(buffer: str, pos: int, markers: tuple[str, ...]) -> tuple[int, str]:
    """The earliest marker in ``buffer[pos:]`` (the longest on a tie), or ``(-1, "")``."""
    best_start, best = -1, ""
    for marker in markers:
        start = buffer.find(marker, pos)
        if start < 0:
            continue
        if best_start < 0 or (start, -len(marker)) < (best_start, -len(best)):
            best_start, best = start, marker
    return best_start, best


# -- tool-call parsing -------------------------------------------------------------------------


def _dump(value: object) -> str:
    """Compact JSON; infinite numbers (``1e999``) make the call malformed."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise _MalformedToolCall(str(exc)) from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_loads(text: str) -> object:
    """`json.loads` without the ``NaN`` / ``Infinity`` extensions."""
    return json.loads(text, parse_constant=_reject_constant)


def _loads(text: str) -> object:
    """`_json_loads` that raises only `_MalformedToolCall` (deep nesting included)."""
    try:
        return _json_loads(text)
    except (ValueError, RecursionError) as exc:
        raise _MalformedToolCall(f"invalid JSON: {exc}") from None


def _parse_tool_call(content: str, schemas: Mapping[str, Mapping[str, object]]) -> tuple[str, str]:
    """``(name, compact JSON arguments)`` from the text between the tool-call markers."""
    body = content.strip()
    if body.startswith(_FUNCTION_OPEN):
        return _parse_function_form(body, schemas)
    call = _loads(body)
    if not isinstance(call, dict):
        raise _MalformedToolCall("not a JSON object")
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise _MalformedToolCall("no name")
    arguments = call["arguments"] if "arguments" in call else call.get("parameters")
    if arguments is None:
        return name, "{}"
    if isinstance(arguments, str):
        arguments = _loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise _MalformedToolCall("arguments are not an object")
    return name, _dump(arguments)


def _parse_function_form(body: str, schemas: Mapping[str, Mapping[str, object]]) -> tuple[str, str]:
    """Qwen3-Coder's ``<function=NAME><parameter=P>V</parameter>…</function>``."""
    head_end = body.find(">")
    if head_end < 0:
        raise _MalformedToolCall("unclosed <function=")
    name = body[len(_FUNCTION_OPEN) : head_end].strip()
    if not name:
        raise _MalformedToolCall("no name")
    rest = body[head_end + 1 :]
    close = rest.find(_FUNCTION_CLOSE)
    if close >= 0:
        if rest[close + len(_FUNCTION_CLOSE) :].strip():
            raise _MalformedToolCall(f"text after {_FUNCTION_CLOSE}")
        rest = rest[:close]
    if _PARAMETER.sub("", rest).strip():
        raise _MalformedToolCall("text outside <parameter=…>")
    properties = schemas.get(name, {})
    arguments: dict[str, object] = {}
    for match in _PARAMETER.finditer(rest):
        key = match.group(1).strip()
        if not key:
            raise _MalformedToolCall("parameter without a name")
        arguments[key] = _coerce(_strip_one_newline(match.group(2)), properties.get(key))
    return name, _dump(arguments)


def _strip_one_newline(value: str) -> str:
    value = value.removeprefix("\n")
    return value.removesuffix("\n")


def _coerce(value: str, schema: object) -> object:
    """A ``<parameter=…>`` value as its schema's type.

    String values stay as they are; integer, number, boolean, object, array and null values are
    parsed as JSON (a schema that also allows strings keeps the text unless it parses as one of
    the other types); without a usable schema JSON is tried. Whatever does not parse stays a
    string.
    """
    types = _schema_types(schema)
    if types and not types & _JSON_TYPES:
        return value
    try:
        parsed = _json_loads(value)
    except (ValueError, RecursionError):
        lowered = value.strip().lower()
        if "boolean" in types and lowered in ("true", "false"):
            return lowered == "true"
        return value
    if "string" in types:
        kind = _json_type(parsed)
        if kind not in types and not (kind == "integer" and "number" in types):
            return value
    return parsed


def _json_type(value: object) -> str:
    """The JSON-schema type name of a parsed JSON value (integers count as ``integer``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _schema_types(schema: object) -> frozenset[str]:
    """The ``type`` names a JSON schema (or its ``anyOf`` / ``oneOf`` branches) allows."""
    if not isinstance(schema, Mapping):
        return frozenset()
    found: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        found.add(declared)
    elif isinstance(declared, list):
        found.update(t for t in declared if isinstance(t, str))
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            for branch in branches:
                found |= _schema_types(branch)
    return frozenset(found)


def _parameter_schemas(
    tools: Sequence[Mapping[str, object]],
) -> dict[str, Mapping[str, object]]:
    """Tool name → its parameters' ``properties`` (OpenAI-shaped or flat tool definitions)."""
    schemas: dict[str, Mapping[str, object]] = {}
    for tool in tools:
        function = tool.get("function", tool)
        if not isinstance(function, Mapping):
            continue
        name = function.get("name")
        parameters = function.get("parameters", function.get("input_schema"))
        if not isinstance(name, str) or not isinstance(parameters, Mapping):
            continue
        properties = parameters.get("properties")
        if isinstance(properties, Mapping):
            schemas[name] = properties
    return schemas
