"""JSON fuzzing material shared by the fault tests: values Python's ``json`` cannot write (numbers
out of every range, deep nesting, tokens that are not JSON), strings with lone surrogates and NUL
(written as escapes), and `mutated`, which changes a valid value somewhere inside."""

from __future__ import annotations

import json
from typing import Any, Final

from hypothesis import strategies as st


class Raw(str):
    """A JSON token written as is (numbers JSON can write but Python cannot round-trip, deep
    nesting, tokens that are not JSON at all)."""


JsonValue = Any  # what `dump` writes: None, bool, int, float, str, Raw, list, dict


def dump(value: JsonValue) -> str:
    """JSON text of ``value``; strings are written with ``\\uXXXX`` escapes for everything outside
    ASCII, so lone surrogates and NUL travel as escapes."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


ODD_CHARS: Final = ["\ud800", "\udfff", "\ud83d", "\x00", "\u2028", "\ufeff", "\U0001f600",
                    "\u0301", "\uffff", "\x7f", "\\", '"', "\n"]
text = st.text(st.characters(codec=None) | st.sampled_from(ODD_CHARS), max_size=24)
small_text = st.text(st.sampled_from("abc xyz"), min_size=1, max_size=12)
ODD_NUMBERS: Final = [Raw(t) for t in (
    "1e400", "-1e400", "1e-400", "-0", "-0.0", "1E2", "4.9e-324", "1.7976931348623157e308",
    "123456789012345678901234567890", "-9223372036854775809", "18446744073709551616",
    "9223372036854775807", "2147483648", "-1", "0",
)]
NOT_JSON: Final = [Raw(t) for t in ("NaN", "Infinity", "-Infinity", "01", "+1", ".5", "1.",
                                    "'x'", "undefined", "tru", "[1,]", '{"a":1,}')]


def deep(depth: int, kind: str) -> Raw:
    """An empty array ``depth`` deep, or an object ``{"a": …}`` holding 1 as deep."""
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


numbers = (st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from(ODD_NUMBERS))
scalars = st.none() | st.booleans() | numbers | text
#: Around the gateway's limit (128) and around the decoder's (Python's recursion limit, ~970 deep
#: once the request's own frames are on the stack).
DEPTHS: Final = [64, 127, 128, 129, 500, 960, 965, 970, 975, 980, 20_000]
nesting = st.builds(deep, st.sampled_from(DEPTHS), st.sampled_from(["list", "dict"]))
json_values: st.SearchStrategy[JsonValue] = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
) | nesting | st.sampled_from(NOT_JSON)


@st.composite
def mutated(draw: st.DrawFn, value: JsonValue, depth: int = 0) -> JsonValue:
    """``value`` with one change somewhere inside: a value replaced, a key deleted or added."""
    if isinstance(value, dict) and value and depth < 4 and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: draw(mutated(value[key], depth + 1))}
    if isinstance(value, list) and value and depth < 4 and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        return [*value[:index], draw(mutated(value[index], depth + 1)), *value[index + 1:]]
    if isinstance(value, dict):
        match draw(st.sampled_from(["replace", "delete", "add"])):
            case "delete" if value:
                key = draw(st.sampled_from(sorted(value)))
                return {k: v for k, v in value.items() if k != key}
            case "add":
                return {**value, draw(text | st.sampled_from(sorted(value) or ["x"])):
                        draw(json_values)}
    return draw(json_values)
