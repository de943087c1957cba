"""The server configs under ops/nats: each one passes ``nats-server -t``, and the roles in
accounts.conf allow exactly the traffic Cortex needs (checked against a real server)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Final

import cyclopts
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

import cortex.cli
import neuron.cli
from bus_schema import subjects
from bus_schema.messages import JobAccepted, JobFinished, JobRequest
from bus_schema.service import GATEWAY_SERVICE, NEURON_SERVICE
from cortex.bus import GatewayBus
from cortex.embedded_nats import EmbeddedNatsServer, find_nats_server
from cortex.fleet import FleetView
from cortex.settings import GatewaySettings
from neuron.settings import ModelSpec, NeuronSettings
from neuron.worker import Worker
from tests.support.nats_sync import confirm_subscriptions
from tests.support.scripted_engine import Script, ScriptedEngine

REPO: Final = Path(__file__).resolve().parents[2]
OPS_NATS: Final = REPO / "ops" / "nats"
ACCOUNTS: Final = OPS_NATS / "accounts.conf"
LEAF: Final = OPS_NATS / "leaf.conf"

PASSWORDS: Final = {
    "gateway": "gateway-test-secret",
    "neuron": "neuron-test-secret",
    "observer": "observer-test-secret",
}
#: What the configs read from the environment (see accounts.conf and leaf.conf).
CONFIG_ENV: Final = {
    "CORTEX_GATEWAY_PASSWORD": PASSWORDS["gateway"],
    "CORTEX_NEURON_PASSWORD": PASSWORDS["neuron"],
    "CORTEX_OBSERVER_PASSWORD": PASSWORDS["observer"],
    "CORTEX_LEAF_HUB_URLS": f"nats-leaf://neuron:{PASSWORDS['neuron']}@nats-a:7422",
}
MODEL: Final = "test-org/ops-model-1.0"
WAIT: Final = 5.0  # seconds: bound on every bus wait


def server_configs() -> list[Path]:
    return [*sorted(OPS_NATS.rglob("*.conf")), REPO / "nats.conf"]


def env_without_cortex() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}


def config_test(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(config)],
        env=env, capture_output=True, text=True, timeout=10, check=False,
    )


def test_every_ops_config_is_found() -> None:
    names = {str(p.relative_to(REPO)) for p in server_configs()}
    assert names >= {
        "nats.conf",
        "ops/nats/single.conf",
        "ops/nats/accounts.conf",
        "ops/nats/leaf.conf",
        "ops/nats/cluster/node-a.conf",
        "ops/nats/cluster/node-b.conf",
        "ops/nats/cluster/node-c.conf",
    }


@pytest.mark.parametrize("config", server_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_config_passes_the_server_config_test(config: Path) -> None:
    result = config_test(config, env_without_cortex() | CONFIG_ENV)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", ["single.conf", "cluster/node-b.conf", "leaf.conf"])
def test_config_refuses_to_load_without_its_secrets(config: str) -> None:
    result = config_test(OPS_NATS / config, env_without_cortex())
    assert result.returncode != 0
    assert "variable reference" in result.stderr


# --- systemd units and env files ----------------------------------------------------------------

SYSTEMD: Final = REPO / "ops" / "systemd"
_ENV_LINE: Final = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")


def env_file(path: Path) -> tuple[set[str], dict[str, str]]:
    """(every variable named, commented or not; the uncommented assignments) of an env file."""
    named: set[str] = set()
    active: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if match := _ENV_LINE.match(line):
            named.add(match.group(1))
            if not line.startswith("#"):
                active[match.group(1)] = match.group(2)
    return named, active


def flags_of(command: Callable[..., object]) -> set[str]:
    return set(inspect.signature(command).parameters)


@pytest.mark.parametrize(
    ("unit", "env_example", "prefix", "app", "argv", "command"),
    [
        ("cortex-gateway.service", "gateway.env.example", "CORTEX_", cortex.cli.app, ["serve"],
         cortex.cli.serve),
        ("cortex-neuron.service", "neuron.env.example", "NEURON_", neuron.cli.app, [],
         neuron.cli.serve),
    ],
    ids=["gateway", "neuron"],
)
def test_units_and_env_files_use_only_real_flags(
    unit: str, env_example: str, prefix: str, app: cyclopts.App, argv: list[str],
    command: Callable[..., object],
) -> None:
    flags = flags_of(command)
    named, active = env_file(SYSTEMD / env_example)
    assert {n.removeprefix(prefix).lower() for n in named if n.startswith(prefix)} <= flags
    exec_start = [line for line in (SYSTEMD / unit).read_text().splitlines()
                  if line.startswith("ExecStart=")]
    assert len(exec_start) == 1
    used = {flag.replace("-", "_") for flag in re.findall(r"--([a-z][a-z-]*)", exec_start[0])}
    assert used <= flags
    # the settings reach the command through cyclopts' environment lookup
    with pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith(prefix)]:
            env.delenv(key)
        for key, value in active.items():
            env.setenv(key, value)
        _, bound, _ = app.parse_args(argv)
    expected = {k.removeprefix(prefix).lower() for k in active if k.startswith(prefix)}
    assert expected <= set(bound.arguments)


# --- the roles against a real server ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Hub:
    """A test nats-server with the Cortex users and a leaf node port."""

    def __init__(self, server: EmbeddedNatsServer, leaf_port: int) -> None:
        self.server = server
        self.leaf_port = leaf_port

    def url(self, role: str) -> str:
        address = self.server.address
        return f"nats://{role}:{PASSWORDS[role]}@{address.host}:{address.port}"


@contextmanager
def hub_server(folder: Path, accounts: str, env: dict[str, str]) -> Iterator[Hub]:
    """A nats-server with ``accounts`` (the text of an accounts file) and a leaf node port."""
    (folder / "accounts.conf").write_text(accounts)  # includes resolve relative to the config
    leaf_port = free_port()
    config = folder / "hub.conf"
    config.write_text(
        "max_payload: 8MB\n"
        f"leafnodes {{ listen: 127.0.0.1:{leaf_port} }}\n"
        "include accounts.conf\n"
    )
    server = EmbeddedNatsServer(port=None, config=config)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        server.start()
    try:
        yield Hub(server, leaf_port)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A server running ops/nats/accounts.conf as it is."""
    with hub_server(tmp_path_factory.mktemp("hub"), ACCOUNTS.read_text(), CONFIG_ENV) as server:
        yield server


def with_per_node_example(accounts: str) -> str:
    """accounts.conf with its commented per-node user (neuron "beast") switched on."""
    head, rest = accounts.split("# BEGIN per-node example\n")
    example, tail = rest.split("# END per-node example\n")
    lines = [line.replace("# ", "", 1) for line in example.splitlines(keepends=True)]
    return head + "".join(lines) + tail


class RoleClient:
    """A nats-py connection that records the errors the server reports (permission violations)."""

    def __init__(self) -> None:
        self.nc = Client()
        self.errors: list[str] = []
        self.error_seen = asyncio.Event()

    async def _on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))
        self.error_seen.set()

    async def wait_error(self) -> str:
        async with asyncio.timeout(WAIT):
            await self.error_seen.wait()
        return self.errors[-1]


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[RoleClient]:
    client = RoleClient()
    await client.nc.connect(
        url, error_cb=client._on_error, allow_reconnect=False, connect_timeout=int(WAIT)
    )
    try:
        yield client
    finally:
        await client.nc.close()


async def next_msg(queue: asyncio.Queue[Msg]) -> Msg:
    async with asyncio.timeout(WAIT):
        return await queue.get()


def gateway_inbox() -> str:
    return f"_INBOX.gw-{uuid.uuid4().hex[:12]}"


async def serve_streams(neuron: Client, subject: str, *, replies: int = 3) -> None:
    """Take jobs on ``subject`` in queue group ``neurons`` and answer each with a stream."""

    async def on_job(msg: Msg) -> None:
        for seq in range(replies):
            await neuron.publish(msg.reply, f"chunk {seq}".encode())

    await neuron.subscribe(subject, queue=subjects.JOB_QUEUE_GROUP, cb=on_job)
    await confirm_subscriptions(neuron)


async def collect(queue: asyncio.Queue[Msg], count: int) -> list[bytes]:
    """Up to ``count`` messages, fewer if the wait runs out (the caller's assert shows which)."""
    received: list[bytes] = []
    with contextlib.suppress(TimeoutError):
        for _ in range(count):
            received.append((await next_msg(queue)).data)
    return received


@pytest.mark.integration
async def test_a_neuron_streams_many_replies_to_the_gateway_inbox(hub: Hub) -> None:
    async with connected(hub.url("gateway")) as gw, connected(hub.url("neuron")) as neuron:
        await serve_streams(neuron.nc, subjects.job_subject(MODEL))
        inbox = gateway_inbox()
        replies: asyncio.Queue[Msg] = asyncio.Queue()
        await gw.nc.subscribe(f"{inbox}.*", cb=replies.put)
        await gw.nc.publish(subjects.job_subject(MODEL), b"job", reply=f"{inbox}.job1")
        received = await collect(replies, 3)
        assert (received, gw.errors, neuron.errors) == (
            [b"chunk 0", b"chunk 1", b"chunk 2"], [], []
        )


@pytest.mark.integration
async def test_the_gateway_gets_no_responders_for_a_model_nobody_serves(hub: Hub) -> None:
    async with connected(hub.url("gateway")) as gw:
        inbox = gateway_inbox()
        replies: asyncio.Queue[Msg] = asyncio.Queue()
        await gw.nc.subscribe(f"{inbox}.*", cb=replies.put)
        await gw.nc.publish(subjects.job_subject("nobody/serves-this"), b"job",
                            reply=f"{inbox}.job1")
        msg = await next_msg(replies)
        assert msg.headers is not None and msg.headers.get("Status") == "503"
        assert gw.errors == []


@pytest.mark.integration
async def test_fleet_messages_control_and_discovery_pass(hub: Hub) -> None:
    node = "beast"
    async with connected(hub.url("gateway")) as gw, connected(hub.url("neuron")) as neuron:
        fleet: asyncio.Queue[Msg] = asyncio.Queue()
        await gw.nc.subscribe(subjects.heartbeat_wildcard(), cb=fleet.put)
        await gw.nc.subscribe(subjects.activation_wildcard(), cb=fleet.put)
        inbox = gateway_inbox()
        await gw.nc.subscribe(f"{inbox}.discover", cb=fleet.put)

        async def answer(msg: Msg) -> None:
            await neuron.nc.publish(msg.reply, b"answer:" + msg.subject.encode())

        await neuron.nc.subscribe(f"cortex.node.{node}.ctl.*", cb=answer)
        await neuron.nc.subscribe(subjects.discover_subject(), cb=answer)
        await serve_streams(neuron.nc, subjects.node_job_subject(node, MODEL), replies=1)
        await confirm_subscriptions(neuron.nc)

        await neuron.nc.publish(subjects.heartbeat_subject(node), b"hb")
        await neuron.nc.publish(subjects.activation_subject(node), b"act")
        await gw.nc.publish(subjects.discover_subject(), b"", reply=f"{inbox}.discover")
        got = {(m.subject, m.data) for m in [await next_msg(fleet) for _ in range(3)]}
        assert got == {
            (subjects.heartbeat_subject(node), b"hb"),
            (subjects.activation_subject(node), b"act"),
            (f"{inbox}.discover", b"answer:cortex.fleet.discover"),
        }

        reply = await gw.nc.request(subjects.control_subject(node, "load"), b"{}", timeout=WAIT)
        assert reply.data == b"answer:cortex.node.beast.ctl.load"
        directed = await gw.nc.request(subjects.node_job_subject(node, MODEL), b"job",
                                       timeout=WAIT)
        assert directed.data == b"chunk 0"
        assert gw.errors == [] and neuron.errors == []


@pytest.mark.integration
async def test_the_observer_sees_traffic_but_cannot_publish_jobs_or_replies(hub: Hub) -> None:
    async with (
        connected(hub.url("neuron")) as neuron,
        connected(hub.url("observer")) as observer,
    ):
        received: asyncio.Queue[Msg] = asyncio.Queue()
        await neuron.nc.subscribe(subjects.job_subject(MODEL), queue=subjects.JOB_QUEUE_GROUP,
                                  cb=received.put)
        await neuron.nc.subscribe("$SRV.PING", cb=received.put)
        watched: asyncio.Queue[Msg] = asyncio.Queue()
        await observer.nc.subscribe("cortex.>", cb=watched.put)
        await confirm_subscriptions(neuron.nc)
        await confirm_subscriptions(observer.nc)

        await observer.nc.publish(subjects.job_subject(MODEL), b"injected")
        assert "permissions violation for publish" in (await observer.wait_error()).lower()
        # The server handles one connection's messages in order: if the job had been delivered,
        # it would arrive before this ping (observers may ping NATS services).
        await observer.nc.publish("$SRV.PING", b"")
        assert (await next_msg(received)).subject == "$SRV.PING"

        await neuron.nc.publish(subjects.heartbeat_subject("beast"), b"hb")
        assert (await next_msg(watched)).subject == subjects.heartbeat_subject("beast")
        assert neuron.errors == []

        observer.error_seen.clear()  # nor forge stream events into a gateway's inbox
        await observer.nc.publish(f"{gateway_inbox()}.job1", b"forged token")
        assert "permissions violation for publish" in (await observer.wait_error()).lower()


def test_the_per_node_example_is_a_valid_config(tmp_path: Path) -> None:
    (tmp_path / "accounts.conf").write_text(with_per_node_example(ACCOUNTS.read_text()))
    env = env_without_cortex() | CONFIG_ENV | {"CORTEX_NEURON_BEAST_PASSWORD": "beast-secret"}
    result = config_test(tmp_path / "accounts.conf", env)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
async def test_the_per_node_user_acts_only_as_its_node_and_in_the_queue_group(
    tmp_path: Path,
) -> None:
    env = CONFIG_ENV | {"CORTEX_NEURON_BEAST_PASSWORD": "beast-secret"}
    accounts = with_per_node_example(ACCOUNTS.read_text())
    with hub_server(tmp_path, accounts, env) as server:
        address = server.server.address
        beast_url = f"nats://neuron-beast:beast-secret@{address.host}:{address.port}"
        async with connected(server.url("gateway")) as gw, connected(beast_url) as beast:
            await serve_streams(beast.nc, subjects.job_subject(MODEL), replies=1)
            reply = await gw.nc.request(subjects.job_subject(MODEL), b"job", timeout=WAIT)
            assert reply.data == b"chunk 0"

            await beast.nc.subscribe(subjects.job_subject(MODEL))  # would copy every job
            assert "permissions violation for subscription" in (await beast.wait_error()).lower()
            beast.error_seen.clear()
            await beast.nc.publish(subjects.heartbeat_subject("other-node"), b"hb")
            assert "permissions violation for publish" in (await beast.wait_error()).lower()


@asynccontextmanager
async def leaf_node(hub: Hub, role: str) -> AsyncIterator[EmbeddedNatsServer]:
    """ops/nats/leaf.conf linked to ``hub`` with the credentials of ``role``."""
    leaf = EmbeddedNatsServer(port=None, config=LEAF)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CORTEX_LEAF_HUB_URLS",
                   f"nats-leaf://{role}:{PASSWORDS[role]}@127.0.0.1:{hub.leaf_port}")
        await asyncio.to_thread(leaf.start)
    try:
        yield leaf
    finally:
        await asyncio.to_thread(leaf.stop)


async def first_answer(gw: Client, subject: str, inbox: str) -> tuple[Msg, asyncio.Queue[Msg]]:
    """Publish a job until the leaf's interest has reached the hub (no more 503)."""
    replies: asyncio.Queue[Msg] = asyncio.Queue()
    await gw.subscribe(f"{inbox}.*", cb=replies.put)
    deadline = time.monotonic() + WAIT
    while True:
        await gw.publish(subject, b"job", reply=f"{inbox}.job1")
        first = await next_msg(replies)
        if first.headers is None or first.headers.get("Status") != "503":
            return first, replies
        assert time.monotonic() < deadline, "the leaf node never joined the hub"
        await asyncio.sleep(0.02)


def test_the_leaf_config_takes_a_list_of_hub_urls() -> None:
    urls = ", ".join(f"nats-leaf://neuron:x@nats-{n}:7422" for n in "abc")
    env = env_without_cortex() | {"CORTEX_LEAF_HUB_URLS": f"[{urls}]"}
    result = config_test(LEAF, env)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
async def test_a_leaf_node_joins_local_neurons_as_the_neuron_role(hub: Hub) -> None:
    async with (
        leaf_node(hub, "neuron") as leaf,
        connected(leaf.url) as local,  # no password on the leaf: loopback only
        connected(hub.url("gateway")) as gw,
        connected(hub.url("observer")) as observer,
    ):
        await serve_streams(local.nc, subjects.job_subject(MODEL))
        first, replies = await first_answer(gw.nc, subjects.job_subject(MODEL), gateway_inbox())
        assert [first.data, *await collect(replies, 2)] == [b"chunk 0", b"chunk 1", b"chunk 2"]

        async def answer(msg: Msg) -> None:
            await local.nc.publish(msg.reply, b"loaded")

        await local.nc.subscribe("cortex.node.gpu1.ctl.*", cb=answer)
        await confirm_subscriptions(local.nc)
        deadline = time.monotonic() + WAIT
        while True:  # the new interest travels to the hub
            try:
                reply = await gw.nc.request(subjects.control_subject("gpu1", "load"), b"{}",
                                            timeout=WAIT)
                break
            except NoRespondersError:
                assert time.monotonic() < deadline, "control never reached the leaf"
                await asyncio.sleep(0.02)
        assert reply.data == b"loaded"

        # Whatever a local process sends, the hub applies the neuron's permissions.
        watched: asyncio.Queue[Msg] = asyncio.Queue()
        await observer.nc.subscribe("cortex.>", cb=watched.put)
        await confirm_subscriptions(observer.nc)
        heartbeat = subjects.heartbeat_subject("gpu1")
        deadline = time.monotonic() + WAIT
        while watched.empty():  # until the observer's interest has reached the leaf
            await local.nc.publish(heartbeat, b"probe")
            await confirm_subscriptions(local.nc)
            assert time.monotonic() < deadline, "heartbeats from the leaf never arrived"
            await asyncio.sleep(0.02)
        await local.nc.publish(subjects.job_subject("other/model"), b"injected")
        await local.nc.publish(heartbeat, b"marker")
        seen: list[tuple[str, bytes]] = []
        while not seen or seen[-1] != (heartbeat, b"marker"):
            msg = await next_msg(watched)
            seen.append((msg.subject, msg.data))
        assert {subject for subject, _ in seen} == {heartbeat}


@pytest.mark.integration
async def test_a_leaf_node_with_the_gateway_role_serves_a_local_gateway(hub: Hub) -> None:
    async with (
        leaf_node(hub, "gateway") as leaf,
        connected(leaf.url) as local_gw,
        connected(hub.url("neuron")) as neuron,
    ):
        await serve_streams(neuron.nc, subjects.job_subject(MODEL))
        first, replies = await first_answer(local_gw.nc, subjects.job_subject(MODEL),
                                            gateway_inbox())
        assert [first.data, *await collect(replies, 2)] == [b"chunk 0", b"chunk 1", b"chunk 2"]

        inbox = gateway_inbox()
        await local_gw.nc.subscribe(f"{inbox}.*", cb=replies.put)
        await local_gw.nc.publish(subjects.job_subject("nobody/serves-this"), b"job",
                                  reply=f"{inbox}.job2")
        msg = await next_msg(replies)
        assert msg.headers is not None and msg.headers.get("Status") == "503"


@pytest.mark.integration
async def test_the_real_gateway_and_neuron_run_under_their_roles(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The shipped roles are enough for the real processes: the gateway routes a job to the neuron
    and streams it back, and both answer `nats micro ls` (as the observer)."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    worker = Worker(
        NeuronSettings(name="ops-n1", nats_url=hub.url("neuron"),
                       models=(ModelSpec(source=str(model), served_name=MODEL),)),
        ScriptedEngine(Script()),
    )
    await worker.start()
    bus = GatewayBus(GatewaySettings(), FleetView())
    try:
        async with asyncio.timeout(WAIT):
            await worker.ready.wait()
        await bus.connect(hub.url("gateway"))
        async with asyncio.timeout(WAIT):
            while not bus.fleet.routable(MODEL):  # noqa: ASYNC110 - heartbeat arrives
                await asyncio.sleep(0.05)
        stream = await bus.submit(JobRequest(job_id="ops-job", model=MODEL, prompt="hi"))
        assert isinstance(await stream.first(), JobAccepted)
        events = [e async for batch in stream.events() if isinstance(batch, list) for e in batch]
        stream.close()
        assert isinstance(events[-1], JobFinished)
        async with connected(hub.url("observer")) as observer:
            inbox = observer.nc.new_inbox()
            pongs: asyncio.Queue[Msg] = asyncio.Queue()
            await observer.nc.subscribe(inbox, cb=pongs.put)
            await observer.nc.publish("$SRV.PING", b"", reply=inbox)
            names = sorted([json.loads((await next_msg(pongs)).data)["name"] for _ in range(2)])
        assert names == [GATEWAY_SERVICE, NEURON_SERVICE]
    finally:
        await bus.close()
        await worker.shutdown()
    violations = [r.getMessage() for r in caplog.records if "ermissions" in r.getMessage()]
    assert violations == []
