from __future__ import annotations

import pytest

from bus_schema.connection import NatsEndpoint, parse_nats_urls, redact_urls


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


@pytest.mark.parametrize(
    "value",
    ["http://gw:hunter2@bus:4222", "nats://gw:hunter2@bus:nope", "nats://gw:hunter/2@bus:4222",
     "nats://gw:hunter2@a:1,nats://other:hunter2@b:2", "nats://gw:hunter2@:4222"],
)
def test_errors_never_show_the_password(value: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_nats_urls(value)
    assert "hunter" not in str(refused.value)
    assert "***" in str(refused.value) or "different credentials" in str(refused.value)


def test_urls_are_redacted_for_logs_and_the_endpoint_repr_hides_secrets() -> None:
    assert redact_urls("nats://gw:hunter2@a:1, tls://t0ken@b:2,c:3,neuron:pw@d") == (
        "nats://gw:***@a:1, tls://***@b:2,c:3,neuron:***@d")
    assert "hunter2" not in repr(parse_nats_urls("nats://gw:hunter2@bus:4222"))
    assert "t0ken" not in repr(parse_nats_urls("nats://t0ken@bus:4222"))


def test_without_a_ca_file_nats_py_keeps_its_default_tls() -> None:
    assert parse_nats_urls("tls://bus:4222").connect_options()["tls"] is None


def test_settings_reprs_never_show_the_bus_password() -> None:
    from cortex.settings import GatewaySettings
    from neuron.settings import NeuronSettings

    url = "nats://neuron-a:hunter2-secret@nats-a:4222"
    assert "hunter2" not in repr(GatewaySettings(nats_url=url))
    assert "hunter2" not in repr(NeuronSettings(nats_url=url))
