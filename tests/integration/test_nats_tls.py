"""The bus over TLS (ops/README.md, "TLS"): a server with a certificate from a private CA, the
gateway and the neuron trusting that CA (``--nats-ca``), a job round trip over ``tls://``."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

import cortex.cli
import neuron.cli
from bus_schema.connection import tls_context
from cortex.bus_roles import BusLock
from cortex.cli import _settings_from
from cortex.embedded_nats import EmbeddedNatsServer
from cortex.settings import GatewaySettings
from neuron.cli import build_settings
from neuron.settings import NeuronSettings
from tests.support.round_trip import one_job, scripted_pair
from tests.support.scripted_engine import Script

pytestmark = pytest.mark.integration

MODEL: Final = "test-org/tls-model-1.0"
NODE: Final = "tls-node"
WAIT: Final = 10.0


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server: Path
    server_key: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA and a server certificate it signed for localhost and 127.0.0.1 (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=cortex test CA")
    run("req", *ec, "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server-key.pem")


@dataclass(frozen=True)
class TlsBus:
    server: EmbeddedNatsServer
    lock: BusLock
    certificates: Certificates

    def url(self, user: str) -> str:
        """The ``tls://`` URL of ``user`` (``gateway`` or ``neuron-<node>``)."""
        login = self.lock.gateway if user == "gateway" else self.lock.neuron(
            user.removeprefix("neuron-"))
        return login.url(self.server.address).replace("nats://", "tls://", 1)


@pytest.fixture(scope="module")
def tls_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBus]:
    folder = tmp_path_factory.mktemp("tls")
    certificates = make_certificates(folder)
    config = folder / "tls.conf"
    config.write_text(  # what ops/README.md tells operators to add to single.conf
        "tls {\n"
        f'  cert_file: "{certificates.server}"\n'
        f'  key_file: "{certificates.server_key}"\n'
        "}\n"
    )
    lock = BusLock.generate(nodes=(NODE,))
    server = EmbeddedNatsServer(port=None, config=config, auth_config=lock.server_config())
    server.start()
    try:
        yield TlsBus(server, lock, certificates)
    finally:
        server.stop()


def tls_handshake(tls_bus: TlsBus, context: ssl.SSLContext) -> dict[str, object]:
    """Read the server's INFO, then do the TLS handshake it asks for; returns the INFO."""
    address = tls_bus.server.address
    with socket.create_connection((address.host, address.port), timeout=WAIT) as sock:
        line = sock.makefile("rb").readline()
        assert line.startswith(b"INFO ")
        with context.wrap_socket(sock, server_hostname=address.host):
            info: dict[str, object] = json.loads(line[5:])
            return info


def test_the_server_demands_tls_and_only_the_ca_makes_it_trusted(tls_bus: TlsBus) -> None:
    info = tls_handshake(tls_bus, tls_context(tls_bus.certificates.ca))  # what --nats-ca builds
    assert info["tls_required"] is True
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        tls_handshake(tls_bus, ssl.create_default_context())  # the system's authorities


async def test_gateway_and_neuron_round_trip_a_job_over_tls(
    tls_bus: TlsBus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with scripted_pair(neuron_url=tls_bus.url(f"neuron-{NODE}"),
                             gateway_url=tls_bus.url("gateway"), node=NODE, model=MODEL,
                             folder=tmp_path, script=Script(words=("over", " TLS")),
                             nats_ca=tls_bus.certificates.ca) as bus:
        events = await one_job(bus, "tls-job", MODEL)
    assert "".join(getattr(e, "text", "") for e in events) == "over TLS"
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")
                and "nats" in r.name.lower() and "disconnect" not in r.getMessage()]


def test_a_missing_ca_file_is_refused_by_the_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NATS CA file"):
        GatewaySettings(nats_ca=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="NATS CA file"):
        NeuronSettings(name="n", nats_ca=tmp_path / "missing.pem")


def test_the_ca_option_reaches_both_settings_from_flags_files_and_env(
    tls_bus: TlsBus, tmp_path: Path
) -> None:
    ca = tls_bus.certificates.ca
    shutil.copy(ca, tmp_path / "bus-ca.pem")
    (tmp_path / "cortex.toml").write_text(
        '[gateway]\nlisten = "127.0.0.1:31313"\n[eviction]\nstrategy = "lru"\n'
        '[nats]\nurl = "tls://gateway:pw@bus:4222"\nca_file = "bus-ca.pem"\n'
    )
    from_file = _settings_from(tmp_path / "cortex.toml", host=None, port=None, nats_url=None,
                               root=None)
    assert from_file.nats_ca == tmp_path / "bus-ca.pem"  # relative to the file
    flagged = _settings_from(tmp_path / "cortex.toml", host=None, port=None, nats_url=None,
                             root=None, nats_ca=ca)
    assert flagged.nats_ca == ca
    assert cortex.cli.app.parse_args(["serve", "--nats-ca", str(ca)])[1].kwargs["nats_ca"] == ca

    (tmp_path / "neuron.toml").write_text('[nats]\nca_file = "bus-ca.pem"\n')
    assert build_settings([], config_path=tmp_path / "neuron.toml", environ={}).nats_ca == (
        tmp_path / "bus-ca.pem")
    assert build_settings([], nats_ca=ca, environ={}).nats_ca == ca
    assert build_settings([], environ={"NEURON_NATS__CA_FILE": str(ca)}).nats_ca == ca
    assert neuron.cli.app.parse_args(["--nats-ca", str(ca)])[1].kwargs["nats_ca"] == ca
