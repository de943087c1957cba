"""A gateway (in this process, on a `LocalStack` whose own neuron serves nothing) and neurons as
real processes (`tests.faults.neuron_main`), which a test can kill (SIGKILL), freeze (SIGSTOP)
and thaw (SIGCONT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from tests.support.scripted_engine import ScriptedEngine
from tests.support.stack import LocalStack

_REPO = Path(__file__).resolve().parents[2]


class NeuronProcess:
    """One neuron process serving ``models`` (``(source, served name)`` pairs)."""

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
                [sys.executable, "-m", "tests.faults.neuron_main", self._spec],
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


class FaultFleet:
    """The gateway and its neuron processes; `revive` restores every neuron between tests."""

    def __init__(self, *, nats_url: str, root: str, log_dir: Path) -> None:
        self.stack = LocalStack(nats_url=nats_url, root=root, engine=ScriptedEngine(), models=[])
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

    def add(self, name: str, models: Sequence[tuple[str, str]]) -> NeuronProcess:
        neuron = NeuronProcess(name, nats_url=self._nats_url, root=self._root, models=models,
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
