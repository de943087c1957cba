from __future__ import annotations

import json

import msgspec
import pytest

from bus_schema import codec, messages
from bus_schema.errors import ErrorCode

SAMPLES: list[messages.BusMessage] = [
    messages.JobRequest(
        job_id="j1",
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        messages=(messages.ChatMessage(role="user", content="hi ✓"),),
        params=messages.SamplingParams(max_tokens=5, temperature=0.0, stop=("\n",), seed=3),
        chat_template_kwargs={"enable_thinking": False},
        deadline=1e9,
    ),
    messages.JobAccepted(job_id="j1", node="n1", model="a/b", prompt_tokens=12, max_tokens=5),
    messages.TokenChunk(job_id="j1", seq=1, text="Par", token_ids=(5, 6)),
    messages.JobFinished(
        job_id="j1", seq=2, finish_reason="stop",
        usage=messages.Usage(prompt_tokens=12, completion_tokens=2),
    ),
    messages.JobFailed(job_id="j1", seq=0, code=ErrorCode.PROMPT_TOO_LONG, message="too long",
                       prompt_tokens=9000, max_prompt_tokens=8192),
    messages.Heartbeat(
        node="n1", seq=1, sent_at=1.0, interval_s=1.0, started_at=0.5,
        devices=(messages.Device(index=0, kind="cpu", name="cpu", memory_total_mb=1,
                                 memory_free_mb=1),),
        models=(messages.ResidentModel(id="a/b", status="loaded"),),
    ),
    messages.Activation(node="n1", event="progress", model="a/b", at=1.0, progress=0.5),
    messages.DiscoverRequest(gateway="gw"),
    messages.LoadRequest(model_id="huggingface:a/b", quant="q4_k_m"),
    messages.UnloadRequest(model_id="a/b"),
    messages.PinRequest(model_id="a/b"),
    messages.CancelJob(job_id="j1"),
    messages.DrainRequest(),
    messages.TokenizeRequest(model="a/b", prompt="x"),
    messages.ControlReply(status=200, tokens=3),
]

DECODERS = {
    messages.JobRequest: codec.decode_job_request,
    messages.DiscoverRequest: codec.decode_discover,
    messages.ControlReply: codec.decode_control_reply,
}


def _decoder_for(message: messages.BusMessage):  # type: ignore[no-untyped-def]
    if isinstance(message, messages.JobAccepted | messages.TokenChunk | messages.JobFinished
                  | messages.JobFailed):
        return codec.decode_job_event
    if isinstance(message, messages.Heartbeat | messages.Activation):
        return codec.decode_fleet_event
    if type(message) in DECODERS:
        return DECODERS[type(message)]
    return codec.decode_control_request


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: messages.BusMessage) -> None:
    data = codec.encode(message)
    assert _decoder_for(message)(data) == message


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_payload_is_readable_json_tagged_by_kind(message: messages.BusMessage) -> None:
    payload = json.loads(codec.encode(message))
    assert payload["kind"] == type(message).__struct_config__.tag


def test_tags_are_unique() -> None:
    classes = [c for c in vars(messages).values()
               if isinstance(c, type) and issubclass(c, messages.BusMessage)
               and c is not messages.BusMessage]
    tags = [c.__struct_config__.tag for c in classes]
    assert len(tags) == len(set(tags)) >= 15


def test_messages_are_frozen() -> None:
    chunk = messages.TokenChunk(job_id="j", seq=1, text="x")
    with pytest.raises(AttributeError):
        chunk.text = "y"  # type: ignore[misc]


def test_unknown_fields_from_a_newer_peer_are_ignored() -> None:
    data = b'{"kind":"tok","job_id":"j","seq":3,"text":"hi","logprobs":[0.1],"future":{"x":1}}'
    event = codec.decode_job_event(data)
    assert event == messages.TokenChunk(job_id="j", seq=3, text="hi")


def test_old_peer_without_new_fields_still_decodes() -> None:
    # A v1 heartbeat that predates every optional field.
    data = b'{"kind":"heartbeat","node":"n","seq":1,"sent_at":1.0,"interval_s":1.0,"started_at":0}'
    beat = codec.decode_fleet_event(data)
    assert isinstance(beat, messages.Heartbeat)
    assert beat.models == () and beat.activation.state == "ready"


class _FrozenV1TokenChunk(msgspec.Struct, frozen=True, tag_field="kind", tag="tok"):
    """A copy of TokenChunk as first released: new builds must still decode for old readers."""

    job_id: str
    seq: int
    text: str


def test_current_messages_decode_with_the_v1_shape() -> None:
    data = codec.encode(messages.TokenChunk(job_id="j", seq=2, text="ab", token_ids=(1, 2)))
    old = msgspec.json.decode(data, type=_FrozenV1TokenChunk)
    assert (old.job_id, old.seq, old.text) == ("j", 2, "ab")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not json", "JSON"),
        (b'{"kind":"tok","job_id":"j","seq":-1,"text":""}', "seq"),
        (b'{"kind":"job","job_id":"","model":"a/b"}', "job_id"),
        (b'{"kind":"nope"}', "kind"),
        (b'{"kind":"accepted","job_id":"j","node":"a.b","model":"m","prompt_tokens":1,'
         b'"max_tokens":1}', "node"),
    ],
)
def test_bad_payloads_raise_a_decode_error(data: bytes, fragment: str) -> None:
    decode = codec.decode_job_request if b'"job"' in data else codec.decode_job_event
    with pytest.raises(codec.BusDecodeError, match=fragment):
        decode(data)
