"""The server configs under ops/nats: each one passes ``nats-server -t``, the neuron-user
template makes valid users, leaf nodes carry the roles, and the real gateway and neuron work under
them (the permission claims themselves are in tests/faults/test_locked_bus.py)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
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
from bus_schema.messages import PinRequest
from bus_schema.service import GATEWAY_SERVICE, NEURON_SERVICE
from cortex.embedded_nats import EmbeddedNatsServer, find_nats_server
from tests.support.nats_roles import (
    ACCOUNTS,
    CONFIG_ENV,
    LEAF_NODE,
    OPS_NATS,
    PASSWORDS,
    REPO,
    WAIT,
    Hub,
    collect,
    connected,
    hub_server,
    next_msg,
    render_neuron_user,
    shipped_accounts,
    with_neuron_users,
)
from tests.support.nats_sync import confirm_subscriptions
from tests.support.round_trip import one_job, scripted_pair

LEAF: Final = OPS_NATS / "leaf.conf"
MODEL: Final = "test-org/ops-model-1.0"


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


# --- the neuron-user template ------------------------------------------------------------------


def test_accounts_with_neuron_users_from_the_template_is_a_valid_config(tmp_path: Path) -> None:
    (tmp_path / "accounts.conf").write_text(shipped_accounts())
    result = config_test(tmp_path / "accounts.conf", env_without_cortex() | CONFIG_ENV)
    assert result.returncode == 0, result.stdout + result.stderr


def neuron_user_commands() -> str:
    """The shell block of ops/README.md's "Neuron users" section."""
    readme = (REPO / "ops" / "README.md").read_text()
    section = readme[readme.index("## Neuron users"):]
    start = section.index("```sh\n") + len("```sh\n")
    return section[start:section.index("\n```", start)]


def test_the_documented_neuron_user_commands_work(tmp_path: Path) -> None:
    """ops/README.md's commands, run as written (in a scratch /etc/nats, without sudo and the
    restart), add the user the tests' renderer makes, and its password."""
    (tmp_path / "accounts.conf").write_text(ACCOUNTS.read_text())
    script = neuron_user_commands()
    assert "node=beast;" in script and "systemctl restart nats-server" in script
    script = "\n".join(line for line in script.replace("node=beast;", "node=gpu-1;").splitlines()
                       if "systemctl" not in line)
    script = script.replace("sudo ", "").replace("/etc/nats/", "$DIR/").replace("/tmp/", "$DIR/")
    subprocess.run(["sh", "-c", script], check=True, timeout=10, cwd=REPO,
                   env=os.environ | {"DIR": str(tmp_path)}, capture_output=True)
    accounts = tmp_path / "accounts.conf"
    assert accounts.read_text() == with_neuron_users(ACCOUNTS.read_text(),
                                                     [render_neuron_user("gpu-1")])
    assert '"cortex.fleet.heartbeat.gpu-1"' in accounts.read_text()
    secret = (tmp_path / "nats.env").read_text()
    assert re.fullmatch(r"CORTEX_NEURON_GPU_1_PASSWORD=[0-9a-f]{48}\n", secret)
    env = env_without_cortex() | CONFIG_ENV
    result = config_test(accounts, env)  # its password unset: the server refuses to start
    assert result.returncode != 0
    assert "variable reference" in result.stderr
    result = config_test(accounts, env | {"CORTEX_NEURON_GPU_1_PASSWORD": secret[29:-1]})
    assert result.returncode == 0, result.stdout + result.stderr


# --- leaf nodes and the real processes against a real server -------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A server running ops/nats/accounts.conf with neuron users made from the template."""
    with hub_server(tmp_path_factory.mktemp("hub")) as server:
        yield server


def gateway_inbox() -> str:
    return subjects.gateway_inbox(f"gw-{os.urandom(6).hex()}")


async def serve_streams(neuron: Client, subject: str, *, replies: int = 3) -> None:
    """Take jobs on ``subject`` in queue group ``neurons`` and answer each with a stream."""

    async def on_job(msg: Msg) -> None:
        for seq in range(replies):
            await neuron.publish(msg.reply, f"chunk {seq}".encode())

    await neuron.subscribe(subject, queue=subjects.JOB_QUEUE_GROUP, cb=on_job)
    await confirm_subscriptions(neuron)


@asynccontextmanager
async def leaf_node(hub: Hub, user: str) -> AsyncIterator[EmbeddedNatsServer]:
    """ops/nats/leaf.conf linked to ``hub`` as ``user``."""
    leaf = EmbeddedNatsServer(port=None, config=LEAF)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CORTEX_LEAF_HUB_URLS",
                   f"nats-leaf://{user}:{PASSWORDS[user]}@127.0.0.1:{hub.leaf_port}")
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
    urls = ", ".join(f"nats-leaf://neuron-gpu1:x@nats-{n}:7422" for n in "abc")
    env = env_without_cortex() | {"CORTEX_LEAF_HUB_URLS": f"[{urls}]"}
    result = config_test(LEAF, env)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
async def test_a_leaf_node_joins_its_local_neuron_as_that_nodes_user(hub: Hub) -> None:
    node = LEAF_NODE
    async with (
        leaf_node(hub, f"neuron-{node}") as leaf,
        connected(leaf.url) as local,  # no password on the leaf: loopback only
        connected(hub.url("gateway"), inbox_prefix=gateway_inbox()) as gw,
        connected(hub.url("observer")) as observer,
    ):
        # Jobs reach the leaf: its user subscribes `cortex.job.*` (the leaf-node exception).
        await serve_streams(local.nc, subjects.job_subject(MODEL))
        first, replies = await first_answer(gw.nc, subjects.job_subject(MODEL), gateway_inbox())
        assert [first.data, *await collect(replies, 2)] == [b"chunk 0", b"chunk 1", b"chunk 2"]

        async def answer(msg: Msg) -> None:
            await local.nc.publish(msg.reply, b"loaded")

        await local.nc.subscribe(f"cortex.node.{node}.ctl.*", cb=answer)
        await confirm_subscriptions(local.nc)
        deadline = time.monotonic() + WAIT
        while True:  # the new interest travels to the hub
            try:
                reply = await gw.nc.request(subjects.control_subject(node, "load"), b"{}",
                                            timeout=WAIT)
                break
            except NoRespondersError:
                assert time.monotonic() < deadline, "control never reached the leaf"
                await asyncio.sleep(0.02)
        assert reply.data == b"loaded"

        # Whatever a local process sends, the hub applies that node's permissions: its own
        # heartbeats pass; jobs and another node's heartbeats are dropped.
        watched: asyncio.Queue[Msg] = asyncio.Queue()
        await observer.nc.subscribe("cortex.>", cb=watched.put)
        await confirm_subscriptions(observer.nc)
        heartbeat = subjects.heartbeat_subject(node)
        deadline = time.monotonic() + WAIT
        while watched.empty():  # until the observer's interest has reached the leaf
            await local.nc.publish(heartbeat, b"probe")
            await confirm_subscriptions(local.nc)
            assert time.monotonic() < deadline, "heartbeats from the leaf never arrived"
            await asyncio.sleep(0.02)
        await local.nc.publish(subjects.job_subject("other/model"), b"injected")
        await local.nc.publish(subjects.heartbeat_subject("beast"), b"impersonated")
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
        connected(hub.url("neuron-beast")) as neuron,
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
    and streams it back, gets its control replies, and both answer `nats micro ls` (as the
    observer)."""
    async with scripted_pair(neuron_url=hub.url("neuron-beast"), gateway_url=hub.url("gateway"),
                             node="beast", model=MODEL, folder=tmp_path) as bus:
        await one_job(bus, "ops-job", MODEL)
        reply = await bus.control("beast", "pin", PinRequest(model_id=MODEL), timeout_s=WAIT)
        assert reply.status == 200, reply
        async with connected(hub.url("observer")) as observer:
            inbox = observer.nc.new_inbox()
            pongs: asyncio.Queue[Msg] = asyncio.Queue()
            await observer.nc.subscribe(inbox, cb=pongs.put)
            await observer.nc.publish("$SRV.PING", b"", reply=inbox)
            names = sorted([json.loads((await next_msg(pongs)).data)["name"] for _ in range(2)])
        assert names == [GATEWAY_SERVICE, NEURON_SERVICE]
    violations = [r.getMessage() for r in caplog.records if "ermissions" in r.getMessage()]
    assert violations == []
