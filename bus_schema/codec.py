"""The only module that knows how bus messages are encoded: JSON, so ``nats sub`` is readable.

Decoders are built once. Each direction has its own decoder over a tagged union, so a payload
decodes to exactly one message type or raises `BusDecodeError`.
"""

from __future__ import annotations

from typing import Final, TypeVar

import msgspec

from bus_schema.messages import (
    BusMessage,
    ControlReply,
    ControlRequest,
    DiscoverRequest,
    FleetEvent,
    JobEvent,
    JobRequest,
)

T = TypeVar("T")
_encoder: Final = msgspec.json.Encoder()
_job_request: Final[msgspec.json.Decoder[JobRequest]] = msgspec.json.Decoder(JobRequest)
_job_event: Final[msgspec.json.Decoder[JobEvent]] = msgspec.json.Decoder(JobEvent)
_fleet_event: Final[msgspec.json.Decoder[FleetEvent]] = msgspec.json.Decoder(FleetEvent)
_discover: Final[msgspec.json.Decoder[DiscoverRequest]] = msgspec.json.Decoder(DiscoverRequest)
_control_request: Final[msgspec.json.Decoder[ControlRequest]] = msgspec.json.Decoder(
    ControlRequest
)
_control_reply: Final[msgspec.json.Decoder[ControlReply]] = msgspec.json.Decoder(ControlReply)


class BusDecodeError(ValueError):
    """A payload is not valid JSON or not a valid message of the expected kind."""


def encode(message: BusMessage) -> bytes:
    """Encode any bus message to JSON bytes."""
    return _encoder.encode(message)


def _decode(decoder: msgspec.json.Decoder[T], data: bytes) -> T:
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise BusDecodeError(str(exc)) from exc
    except RecursionError:  # nesting deeper than the stack allows (in an unknown field, too)
        raise BusDecodeError("message is nested too deeply") from None


def decode_job_request(data: bytes) -> JobRequest:
    """Decode a `JobRequest` (neuron side)."""
    return _decode(_job_request, data)


def decode_job_event(data: bytes) -> JobEvent:
    """Decode one event of a job stream (gateway side)."""
    return _decode(_job_event, data)


def decode_fleet_event(data: bytes) -> FleetEvent:
    """Decode a `Heartbeat` or an `Activation`."""
    return _decode(_fleet_event, data)


def decode_discover(data: bytes) -> DiscoverRequest:
    """Decode a `DiscoverRequest`."""
    return _decode(_discover, data)


def decode_control_request(data: bytes) -> ControlRequest:
    """Decode any control request (neuron side)."""
    return _decode(_control_request, data)


def decode_control_reply(data: bytes) -> ControlReply:
    """Decode a `ControlReply`."""
    return _decode(_control_reply, data)
