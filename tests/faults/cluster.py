"""A gateway (in this process, on a `LocalStack` whose own neuron serves nothing) and neurons as
real processes (`tests.faults.neuron_main`), which a test can kill (SIGKILL), freeze (SIGSTOP)
and thaw (SIGCONT); and nats-servers as processes a test can stop, restart and kill (`NatsProcess`,
`nats_cluster`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import ClassVar

import httpx

from cortex.embedded_nats import find_nats_server
from cortex.settings import GatewaySettings
from tests.support.scripted_engine import ScriptedEngine
from tests.support.stack import LocalStack, free_port

_REPO = Path(__file__).resolve().parents[2]


class NeuronProcess:
    """One neuron process serving ``models`` (``(source, served name)`` pairs)."""

    entry: ClassVar[str] = "tests.faults.neuron_main"
    """The module the process runs."""

    def __init__(self, name: str, *, nats_url: str, root: str,
                 models: Sequence[tuple[str, str]], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._spec = json.dumps({"name": name, "nats_url": nats_url, "root": root,
                                 "models": [list(m) for m in models]})
        self._process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", self.entry, self._spec],
                cwd=_REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.frozen = False

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _signal(self, sig: signal.Signals) -> None:
        assert self._process is not None and self.alive, f"neuron {self.name} is not running"
        self._process.send_signal(sig)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        assert self._process is not None
        self._process.wait(timeout=10)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)
        self.frozen = False

    def stop(self) -> None:
        if not self.alive or self._process is None:
            return
        if self.frozen:
            self.thaw()
        self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class CountingNeuronProcess(NeuronProcess):
    """A neuron process running the counting scripted engine (`tests.faults.scripted_neuron_main`):
    instant, known output, one token per chunk."""

    entry: ClassVar[str] = "tests.faults.scripted_neuron_main"


class FaultFleet:
    """The gateway and its neuron processes; `revive` restores every neuron between tests."""

    def __init__(self, *, nats_url: str, root: str, log_dir: Path,
                 gateway: GatewaySettings | None = None) -> None:
        self.stack = LocalStack(nats_url=nats_url, root=root, engine=ScriptedEngine(), models=[],
                                gateway=gateway)
        self._nats_url = nats_url
        self._root = root
        self._log_dir = log_dir
        self.neurons: dict[str, NeuronProcess] = {}
        self._models: dict[str, list[str]] = {}

    def __enter__(self) -> FaultFleet:
        self.stack.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for neuron in self.neurons.values():
            neuron.stop()
        self.stack.stop()

    def add(self, name: str, models: Sequence[tuple[str, str]],
            kind: type[NeuronProcess] = NeuronProcess) -> NeuronProcess:
        neuron = kind(name, nats_url=self._nats_url, root=self._root, models=models,
                      log_dir=self._log_dir)
        self.neurons[name] = neuron
        for _, served in models:
            self._models.setdefault(served, []).append(name)
        neuron.start()
        return neuron

    def routable(self, model: str) -> set[str]:
        assert self.stack.bus is not None
        return {loc.node for loc in self.stack.bus.fleet.routable(model)}

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until every neuron is up and routable for all its models."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = {model: set(nodes) - self.routable(model)
                       for model, nodes in self._models.items()}
            if not any(missing.values()):
                return
            for neuron in self.neurons.values():
                assert neuron.alive, f"neuron {neuron.name} exited:\n{neuron.log()[-3000:]}"
            assert time.monotonic() < deadline, f"not routable in time: {missing}"
            time.sleep(0.1)

    def revive(self) -> None:
        """Thaw frozen neurons, restart dead ones, and wait until all serve again."""
        for neuron in self.neurons.values():
            if neuron.frozen:
                neuron.thaw()
            elif not neuron.alive:
                neuron.start()
        self.wait_ready()
        self.wait_idle(self.neurons)

    def running(self, node: str) -> int:
        """Jobs the gateway has running on ``node`` now."""
        assert self.stack.bus is not None
        return self.stack.bus.running_on(node)

    def serving(self, timeout_s: float = 10.0) -> list[str]:
        """The neurons the gateway has jobs running on (waits for at least one)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [name for name in self.neurons if self.running(name)]
            if found:
                return found
            assert time.monotonic() < deadline, "no job started"
            time.sleep(0.01)

    def wait_idle(self, nodes: Collection[str], timeout_s: float = 20.0) -> None:
        """Until the heartbeats of ``nodes`` report no running job (a cancelled job ended)."""
        assert self.stack.bus is not None
        fleet = self.stack.bus.fleet
        deadline = time.monotonic() + timeout_s
        while True:
            views = [fleet.node(name) for name in nodes]
            if all(v is not None and fleet.is_healthy(v.name) and v.heartbeat.jobs_running == 0
                   for v in views):
                return
            assert time.monotonic() < deadline, "neurons still report running jobs"
            time.sleep(0.1)


class NatsProcess:
    """A nats-server child process run from ``config`` (written to ``log_dir``), on a fixed
    client port so that it can be stopped and started again on the same port."""

    def __init__(self, name: str, config: str, *, port: int, log_dir: Path,
                 monitor_port: int | None = None) -> None:
        self.name = name
        self.port = port
        self.monitor_port = monitor_port
        self.config_path = log_dir / f"{name}.conf"
        self.config_path.write_text(config, encoding="utf-8")
        self.log_path = log_dir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 15.0) -> None:
        """Start and wait until the server logs that it is ready."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(find_nats_server()), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while "Server is ready" not in self.log()[offset:]:
            assert self.alive, f"nats-server {self.name} exited:\n{self.log()[-2000:]}"
            assert time.monotonic() < deadline, f"nats-server {self.name} not ready in time"
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (the server closes its client connections), then wait."""
        if self._process is None or not self.alive:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

    def kill(self) -> None:
        assert self._process is not None and self.alive, f"nats-server {self.name} is not running"
        self._process.send_signal(signal.SIGKILL)
        self._process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def client_names(self) -> set[str]:
        """The names of the clients connected now (the monitoring endpoint's ``/connz``)."""
        assert self.monitor_port is not None, "started without a monitoring port"
        reply = httpx.get(f"http://127.0.0.1:{self.monitor_port}/connz", params={"limit": 1024},
                          timeout=5)
        reply.raise_for_status()
        return {c.get("name", "") for c in reply.json().get("connections") or ()}

    def route_names(self) -> set[str]:
        """The names of the cluster members this server has a route to (``/routez``)."""
        assert self.monitor_port is not None, "started without a monitoring port"
        reply = httpx.get(f"http://127.0.0.1:{self.monitor_port}/routez", timeout=5)
        reply.raise_for_status()
        return {r.get("remote_name", "") for r in reply.json().get("routes") or ()}


def single_nats(log_dir: Path, name: str = "nats") -> NatsProcess:
    """One server on a free loopback port (not started)."""
    port = free_port()
    return NatsProcess(name, f"server_name: {name}\nlisten: 127.0.0.1:{port}\n"
                             "max_payload: 8MB\n", port=port, log_dir=log_dir)


def nats_cluster(log_dir: Path, size: int = 3, timeout_s: float = 20.0) -> list[NatsProcess]:
    """``size`` servers on free loopback ports clustered by routes to each other, each with a
    monitoring port; started, and returned once every member has a route to every other."""
    ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
    routes = ", ".join(f"nats-route://127.0.0.1:{cluster}" for _, cluster, _ in ports)
    members = []
    for index, (client, cluster, monitor) in enumerate(ports):
        name = f"nats-{index}"
        config = (f"server_name: {name}\nlisten: 127.0.0.1:{client}\n"
                  f"http: 127.0.0.1:{monitor}\nmax_payload: 8MB\n"
                  f"cluster {{\n  name: soak\n  listen: 127.0.0.1:{cluster}\n"
                  f"  routes: [{routes}]\n}}\n")
        members.append(NatsProcess(name, config, port=client, log_dir=log_dir,
                                   monitor_port=monitor))
    for member in members:
        member.start()
    deadline = time.monotonic() + timeout_s
    for member in members:
        others = {m.name for m in members} - {member.name}
        while not others <= member.route_names():
            assert time.monotonic() < deadline, f"{member.name} has no routes to {others}"
            time.sleep(0.1)
    return members
