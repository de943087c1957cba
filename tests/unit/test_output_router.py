"""Output routing: reasoning, content and tool calls out of streamed text (REFERENCE §6.5)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuron.output_router import (
    OutputRouter,
    Piece,
    ReasoningPiece,
    TextPiece,
    ToolCallPiece,
    prompt_opens_reasoning,
)
from neuron.text.detokenize import IncrementalDetokenizer
from neuron.text.tokenizer import Tokenizer
from tests.conftest import smollm2_path
from tests.support.tiny_models import train_tokenizer

#: A piece without the router-specific random part of tool-call ids, for comparisons.
Plain = tuple[str, ...]

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "ratio": {"type": "number"},
                    "options": {"type": "object"},
                    "tags": {"type": "array"},
                    "code": {"type": "string"},
                    "maybe": {"type": ["string", "null"]},
                },
            },
        },
    }
]

TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def run(chunks: Iterable[str], **kwargs: object) -> list[Piece]:
    """Every piece a router emits for ``chunks``, flush included."""
    router = OutputRouter(**kwargs)  # type: ignore[arg-type]
    pieces: list[Piece] = []
    for chunk in chunks:
        pieces += router.push(chunk)
    pieces += router.flush()
    return pieces


def plain(pieces: Sequence[Piece]) -> list[Plain]:
    """Pieces as tuples, adjacent text / reasoning merged, tool-call ids left out."""
    out: list[Plain] = []
    for piece in pieces:
        if isinstance(piece, ToolCallPiece):
            out.append(("tool", str(piece.index), piece.name, piece.arguments))
            continue
        kind = "text" if isinstance(piece, TextPiece) else "reasoning"
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + piece.text)
        else:
            out.append((kind, piece.text))
    return out


def text_of(pieces: Sequence[Piece]) -> str:
    return "".join(p.text for p in pieces if isinstance(p, TextPiece))


def reasoning_of(pieces: Sequence[Piece]) -> str:
    return "".join(p.text for p in pieces if isinstance(p, ReasoningPiece))


def calls_of(pieces: Sequence[Piece]) -> list[ToolCallPiece]:
    return [p for p in pieces if isinstance(p, ToolCallPiece)]


def split_at(text: str, cuts: Iterable[int]) -> list[str]:
    bounds = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def assert_well_formed(pieces: Sequence[Piece]) -> None:
    for piece in pieces:
        if not isinstance(piece, ToolCallPiece):
            assert piece.text


# -- plain text and splitting ------------------------------------------------------------------


def test_plain_text_passes_through_at_once() -> None:
    router = OutputRouter()
    assert router.push("Hello, ") == [TextPiece("Hello, ")]
    assert router.push("world!\n") == [TextPiece("world!\n")]
    assert router.push("") == []
    assert router.flush() == []
    assert router.tool_calls == 0


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_characters="<"), max_size=60))
def test_text_without_marker_starts_is_never_held(text: str) -> None:
    router = OutputRouter()
    for char in text:
        assert router.push(char) == [TextPiece(char)]
    assert router.flush() == []


def test_only_a_possible_marker_start_is_held_back() -> None:
    router = OutputRouter()
    assert router.push("a <th") == [TextPiece("a ")]
    assert router.push("ought") == [TextPiece("<thought")]
    assert router.push("x <") == [TextPiece("x ")]
    assert router.push("/") == []
    assert router.push("b") == [TextPiece("</b")]
    assert router.push("1 < 2 <tool_ca") == [TextPiece("1 < 2 ")]
    assert router.flush() == [TextPiece("<tool_ca")]


def test_held_partial_marker_in_reasoning_is_released_as_reasoning_at_flush() -> None:
    router = OutputRouter(start_in_reasoning=True)
    assert router.push("hmm </thi") == [ReasoningPiece("hmm ")]
    assert router.flush() == [ReasoningPiece("</thi")]


_FRAGMENTS = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        '{"name": "f", "arguments": {"a": 1}}',
        "<function=f><parameter=a>\n1\n</parameter></function>",
        "not json",
        "Hello",
        " ",
        "\n",
        "<",
        "</",
        "<th",
        "ink>",
        "x<t",
        "é🙂",
    ]
)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_split_gives_the_same_pieces(data: st.DataObject) -> None:
    text = "".join(data.draw(st.lists(_FRAGMENTS | st.text(max_size=3), max_size=12)))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    start = data.draw(st.booleans())
    whole = run([text], start_in_reasoning=start)
    pieces = run(split_at(text, cuts), start_in_reasoning=start)
    assert_well_formed(pieces)
    assert plain(pieces) == plain(whole)
    assert plain(run(list(text), start_in_reasoning=start)) == plain(whole)


def test_one_push_merges_adjacent_pieces_of_one_kind() -> None:
    router = OutputRouter()
    assert router.push("a</think>b<think></think>c<think>r") == [
        TextPiece("abc"),
        ReasoningPiece("r"),
    ]


# -- reasoning ---------------------------------------------------------------------------------


def test_reasoning_block_at_every_split_position() -> None:
    text = "<think>a</think>b"
    expected: list[Piece] = [ReasoningPiece("a"), TextPiece("b")]
    assert run([text]) == expected
    for cut in range(len(text) + 1):
        assert plain(run(split_at(text, [cut]))) == plain(expected), cut
    assert plain(run(list(text))) == plain(expected)


def test_whitespace_around_reasoning_is_tidied() -> None:
    pieces = run(["<think>\n", "Okay.\n", "</think>", "\n\n", "Paris."])
    assert plain(pieces) == [("reasoning", "Okay.\n"), ("text", "Paris.")]
    assert run(["<think>\n\n</think>\n\n", "Hi"]) == [TextPiece("Hi")]
    # Whitespace before reasoning and inside the answer is left alone.
    assert plain(run(["Hi \n<think>x</think>a\n\nb"])) == [
        ("text", "Hi \n"),
        ("reasoning", "x"),
        ("text", "a\n\nb"),
    ]


def test_start_in_reasoning() -> None:
    assert run(["x</think>y"], start_in_reasoning=True) == [ReasoningPiece("x"), TextPiece("y")]
    assert run(["\nx", "</think>\n", "y"], start_in_reasoning=True) == [
        ReasoningPiece("x"),
        TextPiece("y"),
    ]
    # An unterminated reasoning block simply ends.
    assert run(["still thinking"], start_in_reasoning=True) == [ReasoningPiece("still thinking")]


def test_stray_markers_are_dropped() -> None:
    assert run(["a</think>\n b"]) == [TextPiece("ab")]
    assert run(["<think>a<think>b</think>c"]) == [ReasoningPiece("ab"), TextPiece("c")]


def test_tool_call_inside_reasoning_is_reasoning() -> None:
    pieces = run([f"<think>{TOOL_CALL}</think>ok"])
    assert pieces == [ReasoningPiece(TOOL_CALL), TextPiece("ok")]


def test_custom_reasoning_markers() -> None:
    pieces = run(["[[a]]b[[/a]]c<think>d"], reasoning_markers=("[[a]]", "[[/a]]"))
    assert pieces == [ReasoningPiece("b"), TextPiece("c<think>d")]


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<think>old</think>\n<|im_start|>assistant\n", False),
        ("<|im_start|>assistant\n", False),
        ("<|im_start|>user\nwhat does <think> do?<|im_end|>\n<|im_start|>assistant\n", False),
        ("", False),
    ],
)
def test_prompt_opens_reasoning(prompt: str, opens: bool) -> None:
    assert prompt_opens_reasoning(prompt) is opens


def test_prompt_opens_reasoning_with_custom_markers() -> None:
    assert prompt_opens_reasoning("x<seed:think>", ("<seed:think>", "</seed:think>"))
    assert not prompt_opens_reasoning("x<think>", ("<seed:think>", "</seed:think>"))


# -- tool calls --------------------------------------------------------------------------------


def test_json_tool_call() -> None:
    router = OutputRouter(job_id="j1")
    pieces = [*router.push("Let me check. "), *router.push(TOOL_CALL), *router.flush()]
    assert pieces[0] == TextPiece("Let me check. ")
    (call,) = calls_of(pieces)
    assert len(pieces) == 2
    assert re.fullmatch(r"call_[0-9a-f]{12}_0", call.id)
    assert call.index == 0
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert call.arguments == '{"city":"Paris"}'  # compact JSON, as §7.3 shows it
    assert router.tool_calls == 1


def test_parallel_tool_calls_get_increasing_indexes_and_one_id_prefix() -> None:
    second = '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>'
    pieces = run([TOOL_CALL, "\n\n", second, "\n"])
    first, other = calls_of(pieces)
    assert len(pieces) == 2  # whitespace between and after the calls is dropped
    assert (first.index, other.index) == (0, 1)
    assert first.id.endswith("_0") and other.id.endswith("_1")
    assert first.id[:-2] == other.id[:-2]
    assert other.name == "get_time"
    assert json.loads(other.arguments) == {"tz": "CET"}
    assert calls_of(run([TOOL_CALL]))[0].id[:-2] != first.id[:-2]  # fresh per router


def test_text_after_a_tool_call_is_kept() -> None:
    pieces = run([TOOL_CALL, "\n", "Done."])
    assert plain(pieces)[1:] == [("text", "\nDone.")]


@pytest.mark.parametrize(
    ("body", "arguments"),
    [
        ('{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}', {"a": [1, 2]}),
        ('{"name": "f", "parameters": {"a": "é"}}', {"a": "é"}),
        ('{"name": "f"}', {}),
        ('{"name": "f", "arguments": null}', {}),
        ('{"name": "f", "arguments": ""}', {}),
    ],
)
def test_tool_call_argument_forms(body: str, arguments: dict[str, object]) -> None:
    (call,) = run([f"<tool_call>{body}</tool_call>"])
    assert isinstance(call, ToolCallPiece)
    assert call.name == "f"
    assert json.loads(call.arguments) == arguments
    assert "\\u" not in call.arguments  # non-ASCII stays as it is


def test_tool_call_at_every_split_position() -> None:
    expected = plain(run(["A", TOOL_CALL, "B"]))
    text = "A" + TOOL_CALL + "B"
    for cut in range(len(text) + 1):
        assert plain(run(split_at(text, [cut]))) == expected, cut


def test_qwen3_coder_function_form_is_coerced_by_schema() -> None:
    body = (
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n5\n</parameter>\n"
        "<parameter=metric>\nTrue\n</parameter>\n"
        "<parameter=ratio>\n0.5\n</parameter>\n"
        '<parameter=options>\n{"units": "C"}\n</parameter>\n'
        "<parameter=tags>\n[1, 2]\n</parameter>\n"
        "<parameter=code>\n123\n</parameter>\n"
        "<parameter=maybe>\nnull\n</parameter>\n"
        "<parameter=unknown>\n7\n</parameter>\n"
        "<parameter=note>\n  two\nlines  \n</parameter>\n"
        "</function>\n</tool_call>"
    )
    (call,) = run([body], tools=WEATHER_TOOLS)
    assert isinstance(call, ToolCallPiece)
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {
        "city": "Paris",
        "days": 5,
        "metric": True,
        "ratio": 0.5,
        "options": {"units": "C"},
        "tags": [1, 2],
        "code": "123",  # the schema says string
        "maybe": None,
        "unknown": 7,  # no schema: JSON if it parses
        "note": "  two\nlines  ",  # only one newline on each side is stripped
    }


def test_qwen3_coder_form_without_tools_or_closing_tags() -> None:
    body = "<tool_call><function=f><parameter=a>5<parameter=b>x y</function></tool_call>"
    (call,) = run([body])
    assert isinstance(call, ToolCallPiece)
    assert call.name == "f"
    assert json.loads(call.arguments) == {"a": 5, "b": "x y"}
    (call,) = run(["<tool_call><function=g></function></tool_call>"])
    assert isinstance(call, ToolCallPiece)
    assert (call.name, call.arguments) == ("g", "{}")


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        '{"name": "f", "arguments": {"a": 1}',
        '{"arguments": {"a": 1}}',
        '{"name": "", "arguments": {}}',
        '{"name": 3}',
        "[1, 2]",
        '{"name": "f", "arguments": [1]}',
        '{"name": "f", "arguments": "not json"}',
        '{"name": "f", "arguments": "[1]"}',
        "[" * 100_000,
        "<function=>x</function>",
        "<function=f",
        "<function=f><parameter=a>1</parameter>junk</function>",
        "<function=f></function> trailing",
        "<function=f><parameter=>1</parameter></function>",
        '{"name": "f", "arguments": {"a": NaN}}',
        '{"name": "f", "arguments": {"a": 1e999}}',
        "",
    ],
)
def test_malformed_tool_call_becomes_raw_text_with_a_warning(
    body: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="neuron.output_router")
    router = OutputRouter(job_id="job-42")
    raw = f"<tool_call>{body}</tool_call>"
    pieces = [*router.push("Hi "), *router.push(raw), *router.push(" bye"), *router.flush()]
    assert plain(pieces) == [("text", f"Hi {raw} bye")]
    assert router.tool_calls == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "job=job-42" in warnings[0].getMessage()


def test_unterminated_tool_call_is_released_as_raw_text_at_flush(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="neuron.output_router")
    router = OutputRouter(job_id="job-7")
    assert router.push("Sure.\n<tool_call>\n") == [TextPiece("Sure.\n")]
    assert router.push('{"name": "f", "argu') == []
    assert router.push('ments": {}}\n</tool_') == []
    assert router.flush() == [TextPiece('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_')]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "job=job-7" in warnings[0].getMessage()


def test_unterminated_tool_call_after_a_good_one_keeps_the_gap() -> None:
    pieces = run([TOOL_CALL, "\n<tool_call>{"])
    assert plain(pieces)[1:] == [("text", "\n<tool_call>{")]


def test_non_finite_values_stay_strings_in_the_function_form() -> None:
    body = "<tool_call><function=f><parameter=a>NaN</parameter></function></tool_call>"
    (call,) = run([body])
    assert isinstance(call, ToolCallPiece)
    assert call.arguments == '{"a":"NaN"}'


def test_empty_markers_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        OutputRouter(tool_markers=("", "</tool_call>"))


def test_custom_tool_markers() -> None:
    pieces = run(
        ['[TOOL]{"name": "f", "arguments": {}}[/TOOL]<tool_call>'],
        tool_markers=("[TOOL]", "[/TOOL]"),
    )
    assert plain(pieces) == [("tool", "0", "f", "{}"), ("text", "<tool_call>")]


# -- real tokenizers ---------------------------------------------------------------------------

MODEL_OUTPUTS = [
    (
        "<think>Let me think.</think>The capital of France is Paris.",
        [("reasoning", "Let me think."), ("text", "The capital of France is Paris.")],
    ),
    (
        "I will check.\n" + TOOL_CALL,
        [("text", "I will check.\n"), ("tool", "0", "get_weather", '{"city":"Paris"}')],
    ),
    (
        "<think>\nWeather?\n</think>\n\n" + TOOL_CALL + "\n" + TOOL_CALL,
        [
            ("reasoning", "Weather?\n"),
            ("tool", "0", "get_weather", '{"city":"Paris"}'),
            ("tool", "1", "get_weather", '{"city":"Paris"}'),
        ],
    ),
]


def stream_through(
    decode: Callable[[Sequence[int]], str], ids: Sequence[int]
) -> tuple[list[str], list[Piece]]:
    """Feed ``ids`` one at a time through the detokenizer and a router."""
    detok = IncrementalDetokenizer(decode)
    router = OutputRouter(tools=WEATHER_TOOLS)
    texts: list[str] = []
    pieces: list[Piece] = []
    for token_id in ids:
        text = detok.push(token_id)
        texts.append(text)
        pieces += router.push(text)
    texts.append(detok.flush())
    pieces += router.push(texts[-1])
    pieces += router.flush()
    return texts, pieces


def check_tokenizer(tokenizer: Tokenizer, *, think_is_split: bool) -> None:
    for output, expected in MODEL_OUTPUTS:
        ids = tokenizer.encode(output)
        texts, pieces = stream_through(tokenizer.decode, ids)
        assert "".join(texts) == output
        for marker in ("<think>", "<tool_call>", "</tool_call>"):
            if marker in output and (marker != "<think>" or think_is_split):
                # The marker reaches the router over several pushes, never in one.
                assert not any(marker in text for text in texts), marker
        assert_well_formed(pieces)
        assert plain(pieces) == expected


def test_tiny_tokenizer_stream_is_routed() -> None:
    tokenizer = Tokenizer(train_tokenizer())
    # <think> / </think> are added tokens (one id each); <tool_call> is spelled out.
    assert len(tokenizer.encode("<think>")) == 1
    assert len(tokenizer.encode("<tool_call>")) > 1
    check_tokenizer(tokenizer, think_is_split=False)


@pytest.mark.slow
def test_smollm2_tokenizer_stream_is_routed() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(gguf.GGUFReader(str(smollm2_path())))
    # SmolLM2 has no reasoning or tool tokens: every marker is split.
    assert len(tokenizer.encode("<think>")) > 1
    check_tokenizer(tokenizer, think_is_split=True)


def test_without_tools_tool_markup_stays_text() -> None:
    router = OutputRouter(parse_tools=False, job_id="j1")
    pieces = [*router.push("<think>hm</think>Sure: "), *router.push(TOOL_CALL), *router.flush()]
    assert pieces[0] == ReasoningPiece("hm")
    assert all(isinstance(p, TextPiece) for p in pieces[1:])
    assert "".join(p.text for p in pieces[1:] if isinstance(p, TextPiece)) == "Sure: " + TOOL_CALL
    assert router.tool_calls == 0
