"""`cortex.http.nested_deeper_than`: the nesting limit on request bodies, against the depth of the
value the JSON text encodes (brackets, quotes and backslashes inside strings included)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.http import MAX_JSON_DEPTH, nested_deeper_than

tricky = st.text(st.sampled_from('[]{}"\\ ab\u00e9'), max_size=8)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky, inner, max_size=3),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def wrap(value: Any, levels: int, kind: st.DataObject) -> Any:
    for _ in range(levels):
        value = [value] if kind.draw(st.booleans()) else {"k[": value, "x": "]]"}
    return value


@settings(max_examples=300, deadline=None)
@given(value=values, levels=st.integers(0, 12), limit=st.integers(1, 16), data=st.data())
def test_the_limit_matches_the_depth_of_the_value(
    value: Any, levels: int, limit: int, data: st.DataObject
) -> None:
    value = wrap(value, levels, data)
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        assert nested_deeper_than(text.encode(), limit) == (depth(value) > limit)


def test_deep_bodies_at_the_gateway_limit() -> None:
    at_limit = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert not nested_deeper_than(at_limit, MAX_JSON_DEPTH)
    assert nested_deeper_than(b"[" + at_limit + b"]", MAX_JSON_DEPTH)
    interleaved = b"[[]," * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert nested_deeper_than(interleaved, MAX_JSON_DEPTH)
    flat = b"[" + b"[1,{}]," * 100_000 + b"[]]"
    assert not nested_deeper_than(flat, MAX_JSON_DEPTH)
    quoted = b'{"a": "' + b"[" * 1000 + b'", "b": "\\"' + b"{" * 1000 + b'"}'
    assert not nested_deeper_than(quoted, MAX_JSON_DEPTH)
