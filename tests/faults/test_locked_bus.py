"""A locked bus: who may do what on it, checked against real nats-servers.

Every claim runs twice: on a server with the shipped roles (ops/nats/accounts.conf plus neuron users
made from neuron-user.conf.template) and on the embedded server `cortex up` locks with a
`BusLock`. Then `cortex up` itself: nothing else on the host can join its bus, and its passwords
reach neither a command line nor a log line.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import httpx
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_schema import subjects
from bus_schema.messages import PinRequest
from cortex.bus_roles import BusLock
from cortex.embedded_nats import DEFAULT_CONFIG, EmbeddedNatsServer, ServerAddress
from cortex.stack import StackOptions, neuron_command, neuron_environment
from tests.support.nats_roles import (
    WAIT,
    Hub,
    RoleClient,
    collect,
    connected,
    hub_server,
    next_msg,
)
from tests.support.nats_sync import confirm_subscriptions
from tests.support.round_trip import one_job, scripted_pair
from tests.support.stack import free_port
from tests.support.stack_output import Output
from tests.support.tiny_models import TinyModel

MODEL: Final = "test-org/locked-model-1.0"
NODE_A: Final = "beast"
NODE_B: Final = "gpu2"
PUBLISH_REFUSED: Final = "permissions violation for publish"
SUBSCRIBE_REFUSED: Final = "permissions violation for subscription"


@pytest.fixture(scope="module", params=["shipped", "embedded"])
def bus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Hub]:
    """A real nats-server with users `gateway`, `neuron-beast` and `neuron-gpu2`: the shipped
    config (plus `observer`), or the embedded server locked as `cortex up` locks it."""
    if request.param == "shipped":
        with hub_server(tmp_path_factory.mktemp("shipped")) as hub:
            yield hub
        return
    lock = BusLock.generate(nodes=(NODE_A, NODE_B))
    server = EmbeddedNatsServer(port=None, auth_config=lock.server_config())
    server.start()
    try:
        yield Hub(server, {u.name: u.password for u in (lock.gateway, *lock.neurons)})
    finally:
        server.stop()


def gateway_inbox() -> str:
    return subjects.gateway_inbox(f"gw-{os.urandom(6).hex()}")


@asynccontextmanager
async def as_gateway(bus: Hub) -> AsyncIterator[RoleClient]:
    """Connected as the gateway, with a gateway's inbox prefix (as `GatewayBus` connects)."""
    async with connected(bus.url("gateway"), inbox_prefix=gateway_inbox()) as client:
        yield client


async def refused(client: RoleClient, what: str) -> None:
    """The server reports a permission violation of kind ``what`` to ``client``."""
    assert what in (await client.wait_error()).lower()


async def log_in(url: str) -> None:
    """Connect to ``url`` and leave; raises what nats-py raises when the server refuses."""
    nc = Client()
    try:
        await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0,
                         connect_timeout=int(WAIT))
    finally:
        await nc.close()  # also the socket of a refused login


# --- who may log in ----------------------------------------------------------------------------


@pytest.mark.integration
async def test_an_anonymous_or_wrong_password_connection_is_refused(bus: Hub) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await log_in(bus.anonymous_url)
    address = bus.server.address
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await log_in(f"nats://neuron-{NODE_A}:wrong-password@{address.host}:{address.port}")
    await log_in(bus.url(f"neuron-{NODE_A}"))  # the right one gets in


# --- what the roles allow ----------------------------------------------------------------------


@pytest.mark.integration
async def test_a_job_streams_back_and_control_and_discovery_answer(bus: Hub) -> None:
    async with as_gateway(bus) as gw, connected(bus.url(f"neuron-{NODE_A}")) as neuron:
        async def on_job(msg: Msg) -> None:
            for seq in range(3):  # many replies on the gateway's inbox
                await neuron.nc.publish(msg.reply, f"chunk {seq}".encode())

        async def answer(msg: Msg) -> None:
            await neuron.nc.publish(msg.reply, b"answer:" + msg.subject.encode())

        await neuron.nc.subscribe(subjects.job_subject(MODEL), queue=subjects.JOB_QUEUE_GROUP,
                                  cb=on_job)
        await neuron.nc.subscribe(f"cortex.node.{NODE_A}.ctl.*", cb=answer)
        await neuron.nc.subscribe(subjects.node_job_subject(NODE_A, MODEL), cb=answer)
        await neuron.nc.subscribe(subjects.discover_subject(), cb=answer)
        await confirm_subscriptions(neuron.nc)

        inbox = gateway_inbox()
        replies: asyncio.Queue[Msg] = asyncio.Queue()
        await gw.nc.subscribe(f"{inbox}.*", cb=replies.put)
        await gw.nc.publish(subjects.job_subject(MODEL), b"job", reply=f"{inbox}.job1")
        assert await collect(replies, 3) == [b"chunk 0", b"chunk 1", b"chunk 2"]
        await gw.nc.publish(subjects.discover_subject(), b"", reply=f"{inbox}.discover")
        assert (await next_msg(replies)).data == b"answer:cortex.fleet.discover"
        await gw.nc.publish(subjects.job_subject("nobody/serves-this"), b"job",
                            reply=f"{inbox}.job2")
        status = await next_msg(replies)
        assert status.headers is not None and status.headers.get("Status") == "503"

        reply = await gw.nc.request(subjects.control_subject(NODE_A, "load"), b"{}",
                                    timeout=WAIT)
        assert reply.data == b"answer:cortex.node.beast.ctl.load"
        directed = await gw.nc.request(subjects.node_job_subject(NODE_A, MODEL), b"job",
                                       timeout=WAIT)
        assert directed.data == f"answer:{subjects.node_job_subject(NODE_A, MODEL)}".encode()
        assert (gw.errors, neuron.errors) == ([], [])


@pytest.mark.integration
async def test_a_neuron_answers_other_requesters_once_per_request(bus: Hub) -> None:
    """``allow_responses``: the `nats` CLI's control requests and `$SRV` pings come from inboxes
    outside the gateways' prefix; the neuron may answer each request there once, and no more."""
    async with as_gateway(bus) as gw, connected(bus.url(f"neuron-{NODE_A}")) as neuron:
        async def answer_twice(msg: Msg) -> None:
            await neuron.nc.publish(msg.reply, b"first")
            await neuron.nc.publish(msg.reply, b"second")

        await neuron.nc.subscribe(f"cortex.node.{NODE_A}.ctl.*", cb=answer_twice)
        await confirm_subscriptions(neuron.nc)
        inbox = "_INBOX.cli-requester.1"  # a `nats req` without --inbox-prefix
        await gw.nc.publish(subjects.control_subject(NODE_A, "load"), b"{}", reply=inbox)
        await refused(neuron, PUBLISH_REFUSED)
        await confirm_subscriptions(neuron.nc)  # any error for the first answer came before
        assert len(neuron.errors) == 1  # the second answer only
        await neuron.nc.publish(inbox, b"unasked")  # and no answer without a request
        await refused(neuron, PUBLISH_REFUSED)


@pytest.mark.integration
async def test_a_neuron_cannot_publish_on_an_inbox_outside_the_gateways(bus: Hub) -> None:
    async with connected(bus.url(f"neuron-{NODE_A}")) as neuron:
        await neuron.nc.publish("_INBOX.someone-else.1", b"forged")
        await refused(neuron, PUBLISH_REFUSED)
        await neuron.nc.publish("_INBOX.other-root.gw-1.1", b"forged")
        await refused(neuron, PUBLISH_REFUSED)


@pytest.mark.integration
async def test_a_neuron_cannot_read_gateway_inboxes_or_publish_jobs(bus: Hub) -> None:
    async with connected(bus.url(f"neuron-{NODE_A}")) as neuron:
        for pattern in ("_INBOX.>", subjects.inbox_wildcard(), f"{gateway_inbox()}.*"):
            await neuron.nc.subscribe(pattern)
            await refused(neuron, SUBSCRIBE_REFUSED)
        for subject in (subjects.job_subject(MODEL), subjects.node_job_subject(NODE_B, MODEL),
                        subjects.control_subject(NODE_B, "unload"), subjects.discover_subject()):
            await neuron.nc.publish(subject, b"{}")
            await refused(neuron, PUBLISH_REFUSED)


@pytest.mark.integration
async def test_a_neuron_takes_jobs_only_in_the_queue_group(bus: Hub) -> None:
    async with as_gateway(bus) as gw, connected(bus.url(f"neuron-{NODE_A}")) as neuron:
        copies: asyncio.Queue[Msg] = asyncio.Queue()
        await neuron.nc.subscribe(subjects.job_subject(MODEL), cb=copies.put)  # every job
        await refused(neuron, SUBSCRIBE_REFUSED)
        await neuron.nc.subscribe("cortex.job.*", queue="not-neurons", cb=copies.put)
        await refused(neuron, SUBSCRIBE_REFUSED)
        taken: asyncio.Queue[Msg] = asyncio.Queue()
        await neuron.nc.subscribe(subjects.job_subject(MODEL), queue=subjects.JOB_QUEUE_GROUP,
                                  cb=taken.put)
        await confirm_subscriptions(neuron.nc)
        await gw.nc.publish(subjects.job_subject(MODEL), b"job", reply=f"{gateway_inbox()}.1")
        assert (await next_msg(taken)).data == b"job"
        assert copies.empty()


@pytest.mark.integration
async def test_a_neuron_acts_only_under_its_own_node_name(bus: Hub) -> None:
    async with connected(bus.url(f"neuron-{NODE_A}")) as neuron_a:
        for subject in (subjects.heartbeat_subject(NODE_B), subjects.activation_subject(NODE_B)):
            await neuron_a.nc.publish(subject, b"impersonated")
            await refused(neuron_a, PUBLISH_REFUSED)
        for pattern in (f"cortex.node.{NODE_B}.ctl.*", subjects.node_job_subject(NODE_B, MODEL),
                        "cortex.node.*.ctl.*", "cortex.fleet.heartbeat.*"):
            await neuron_a.nc.subscribe(pattern)
            await refused(neuron_a, SUBSCRIBE_REFUSED)


@pytest.mark.integration
async def test_forged_fleet_messages_never_reach_the_gateway(bus: Hub) -> None:
    """A gateway cannot publish heartbeats or activations, nor node A as node B: the gateway's
    fleet subscription sees only node B's own heartbeat."""
    async with (
        as_gateway(bus) as gw,
        connected(bus.url(f"neuron-{NODE_A}")) as neuron_a,
        connected(bus.url(f"neuron-{NODE_B}")) as neuron_b,
    ):
        fleet: asyncio.Queue[Msg] = asyncio.Queue()
        await gw.nc.subscribe(subjects.heartbeat_wildcard(), cb=fleet.put)
        await gw.nc.subscribe(subjects.activation_wildcard(), cb=fleet.put)
        await confirm_subscriptions(gw.nc)
        await gw.nc.publish(subjects.heartbeat_subject(NODE_B), b"forged by the gateway")
        await refused(gw, PUBLISH_REFUSED)
        await gw.nc.publish(subjects.activation_subject(NODE_B), b"forged by the gateway")
        await refused(gw, PUBLISH_REFUSED)
        await neuron_a.nc.publish(subjects.heartbeat_subject(NODE_B), b"forged by node A")
        await refused(neuron_a, PUBLISH_REFUSED)
        await neuron_b.nc.publish(subjects.heartbeat_subject(NODE_B), b"real")
        msg = await next_msg(fleet)
        assert (msg.subject, msg.data) == (subjects.heartbeat_subject(NODE_B), b"real")
        assert neuron_b.errors == []


@pytest.mark.integration
@pytest.mark.parametrize("bus", ["shipped"], indirect=True)  # cortex up's bus has no observer
async def test_the_observer_watches_but_cannot_publish(bus: Hub) -> None:
    async with (
        connected(bus.url("observer")) as observer,
        connected(bus.url(f"neuron-{NODE_A}")) as neuron,
    ):
        received: asyncio.Queue[Msg] = asyncio.Queue()
        await neuron.nc.subscribe(subjects.job_subject(MODEL), queue=subjects.JOB_QUEUE_GROUP,
                                  cb=received.put)
        await neuron.nc.subscribe("$SRV.PING", cb=received.put)
        watched: asyncio.Queue[Msg] = asyncio.Queue()
        await observer.nc.subscribe("cortex.>", cb=watched.put)
        await confirm_subscriptions(neuron.nc)
        await confirm_subscriptions(observer.nc)
        for subject in (subjects.job_subject(MODEL), subjects.node_job_subject(NODE_A, MODEL),
                        subjects.control_subject(NODE_A, "drain"), subjects.discover_subject(),
                        subjects.heartbeat_subject(NODE_A), subjects.activation_subject(NODE_A),
                        f"{gateway_inbox()}.job1", "_INBOX.x.1"):
            await observer.nc.publish(subject, b"written by the observer")
            await refused(observer, PUBLISH_REFUSED)
        # The server handles one connection's messages in order: had the job been delivered, it
        # would arrive before this ping (observers may ping NATS services).
        await observer.nc.publish("$SRV.PING", b"")
        assert (await next_msg(received)).subject == "$SRV.PING"
        await neuron.nc.publish(subjects.heartbeat_subject(NODE_A), b"hb")
        msg = await next_msg(watched)
        assert (msg.subject, msg.data) == (subjects.heartbeat_subject(NODE_A), b"hb")


@pytest.mark.integration
async def test_the_real_gateway_and_neuron_work_on_the_locked_bus(
    bus: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with scripted_pair(neuron_url=bus.url(f"neuron-{NODE_A}"),
                             gateway_url=bus.url("gateway"), node=NODE_A, model=MODEL,
                             folder=tmp_path) as gateway:
        await one_job(gateway, "locked-job", MODEL)
        reply = await gateway.control(NODE_A, "pin", PinRequest(model_id=MODEL), timeout_s=WAIT)
        assert reply.status == 200, reply
    violations = [r.getMessage() for r in caplog.records if "ermissions" in r.getMessage()]
    assert violations == []


# --- the embedded server's secrets ---------------------------------------------------------------


def test_the_embedded_config_is_private_and_removed_at_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    lock = BusLock.generate(nodes=("local",))
    server = EmbeddedNatsServer(port=None, auth_config=lock.server_config())
    server.start()
    config = server.config_path
    try:
        assert config is not None
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        text = config.read_text()
        assert DEFAULT_CONFIG.read_text() in text  # the base settings still apply
        assert lock.gateway.password in text and lock.neuron("local").password in text
    finally:
        server.stop()
    assert not config.parent.exists()
    secrets = (lock.gateway.password, lock.neuron("local").password)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "password-protected" in logged
    assert not any(secret in logged for secret in secrets)
    assert not any(secret in repr(lock) for secret in secrets)


def test_the_neuron_of_cortex_up_gets_its_url_in_its_environment_only() -> None:
    lock = BusLock.generate(nodes=("local",))
    url = lock.neuron("local").url(ServerAddress("127.0.0.1", 4222))
    command = neuron_command(StackOptions(), Path("/m.gguf"))
    assert "--nats-url" not in command
    assert not any(lock.neuron("local").password in arg for arg in command)
    assert neuron_environment(url)["NEURON_NATS_URL"] == url


# --- `cortex up` -------------------------------------------------------------------------------


def children(pid: int) -> dict[int, list[str]]:
    """The command lines of ``pid``'s child processes (Linux /proc), as any local user sees them."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if re.search(rf"^PPid:\s+{pid}$", status, re.MULTILINE):
            found[int(entry.name)] = cmdline.decode().split("\0")
    return found


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_cortex_up_locks_its_bus_and_never_shows_the_passwords(tiny_model: TinyModel) -> None:
    nats_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex", "up", "--model", str(tiny_model.gguf_path),
         "--served-name", "tiny/llama", "--port", str(free_port()), "--nats-port",
         str(nats_port), "--device", "cpu", "--log-level", "debug"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = Output(proc)
    try:
        # ready means the gateway has the neuron's heartbeat: both logged in
        assert output.ready.wait(timeout=90), output.text()
        commands = children(proc.pid)
        [config] = [Path(cmd[cmd.index("-c") + 1]) for cmd in commands.values()
                    if "-c" in cmd and cmd[0].endswith("nats-server")]
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        secrets = re.findall(r'"password":"([^"]+)"', config.read_text())
        assert len(secrets) == 2  # gateway, neuron-local
        assert not any(s in arg for s in secrets for cmd in commands.values() for arg in cmd)

        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(log_in(f"nats://127.0.0.1:{nats_port}"))
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(log_in(f"nats://neuron:guess@127.0.0.1:{nats_port}"))

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0, output.text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        text = output.text()
        if proc.stdout is not None:
            proc.stdout.close()
    assert "password-protected" in text
    assert not any(secret in text for secret in secrets), "a password reached the output"
    assert not config.parent.exists()


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_cortex_serve_without_a_nats_url_runs_a_bus_only_it_can_use(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORTEX_", "NATS_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex", "serve", "--port", str(port), "--log-level", "debug"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env | {"PYTHONUNBUFFERED": "1"},
    )
    output = Output(proc)
    try:
        assert asyncio.run(_wait_for_ready(f"http://127.0.0.1:{port}/ready")), output.text()
        [nats_port] = re.findall(r"embedded NATS server ready on nats://127\.0\.0\.1:(\d+)",
                                 "".join(output.lines))
        [config] = [Path(cmd[cmd.index("-c") + 1]) for cmd in children(proc.pid).values()
                    if "-c" in cmd and cmd[0].endswith("nats-server")]
        secrets = re.findall(r'"password":"([^"]+)"', config.read_text())
        assert re.findall(r'"user":"([^"]+)"', config.read_text()) == ["gateway"]  # no neuron
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(log_in(f"nats://127.0.0.1:{nats_port}"))
        proc.send_signal(signal.SIGTERM)  # as systemd stops it
        assert proc.wait(timeout=30) == 0, output.text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        text = output.text()
        if proc.stdout is not None:
            proc.stdout.close()
    assert secrets and not any(secret in text for secret in secrets)
    assert not config.parent.exists()


async def _wait_for_ready(url: str) -> bool:
    """True once ``url`` answers 200 (within 30 s)."""
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            try:
                if (await client.get(url, timeout=1)).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    return False
