from __future__ import annotations

import pytest

from bus_schema.connection import NatsEndpoint, parse_nats_urls


def test_a_single_url_without_credentials() -> None:
    assert parse_nats_urls("nats://127.0.0.1:4222") == NatsEndpoint(
        servers=("nats://127.0.0.1:4222",)
    )


def test_credentials_are_lifted_out_and_apply_to_every_member() -> None:
    endpoint = parse_nats_urls("nats://neuron:s%40cret@nats-a:4222, nats-b:4222,tls://nats-c")
    assert endpoint.servers == ("nats://nats-a:4222", "nats://nats-b:4222", "tls://nats-c")
    assert (endpoint.user, endpoint.password, endpoint.token) == ("neuron", "s@cret", None)
    assert "s@cret" not in endpoint.redacted()


def test_a_bare_user_part_is_a_token() -> None:
    endpoint = parse_nats_urls("nats://t0ken@bus:4222")
    assert endpoint.token == "t0ken" and endpoint.user is None


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "no NATS server URL"),
        (" , ", "no NATS server URL"),
        ("http://bus:4222", "unsupported NATS URL scheme"),
        ("nats://a:p@x:1,nats://b:q@y:2", "different credentials"),
        ("nats://:4222", "without a host"),
    ],
)
def test_bad_urls_are_refused(value: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_nats_urls(value)
