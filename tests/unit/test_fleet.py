"""The gateway's fleet view: heartbeats replace, activations update, silence makes stale."""

from __future__ import annotations

import pytest

from bus_schema.messages import Activation, Heartbeat, ResidentModel
from cortex.fleet import LOST_AFTER_BEATS, LOST_AFTER_S, FleetView


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def beat(node: str, *models: ResidentModel, jobs: int = 0, draining: bool = False) -> Heartbeat:
    return Heartbeat(node=node, seq=1, sent_at=0.0, interval_s=1.0, started_at=0.0,
                     models=models, jobs_running=jobs, draining=draining)


def loaded(model: str) -> ResidentModel:
    return ResidentModel(id=model, status="loaded")


def test_routable_prefers_the_least_loaded_healthy_node() -> None:
    fleet = FleetView(Clock())
    fleet.apply(beat("a", loaded("m/x"), jobs=3))
    fleet.apply(beat("b", loaded("m/x"), jobs=1))
    fleet.apply(beat("c", loaded("m/y")))
    assert [loc.node for loc in fleet.routable("m/x")] == ["b", "a"]
    assert fleet.model_ids() == ["m/x", "m/y"]


def test_a_node_silent_for_three_intervals_leaves_routing() -> None:
    clock = Clock()
    fleet = FleetView(clock)
    fleet.apply(beat("a", loaded("m/x")))
    clock.now += 2.9
    assert fleet.routable("m/x") and fleet.health() == (1, 1)
    clock.now += 0.2
    assert fleet.routable("m/x") == []
    assert fleet.health() == (0, 1)
    assert fleet.locations("m/x")[0].healthy is False


def test_activation_ready_makes_a_model_routable_before_the_next_heartbeat() -> None:
    fleet = FleetView(Clock())
    fleet.apply(beat("a"))
    fleet.apply(Activation(node="a", event="progress", model="m/x", at=0.0, progress=0.5))
    assert fleet.routable("m/x") == []
    assert fleet.locations("m/x")[0].status == "loading"
    report = fleet.model("m/x")
    assert report is not None and report.load_progress == 0.5
    fleet.apply(Activation(node="a", event="ready", model="m/x", at=0.0, progress=1.0))
    assert [loc.node for loc in fleet.routable("m/x")] == ["a"]
    fleet.apply(Activation(node="a", event="unloaded", model="m/x", at=0.0))
    assert fleet.locations("m/x") == []


def test_draining_nodes_take_no_new_jobs() -> None:
    fleet = FleetView(Clock())
    fleet.apply(beat("a", loaded("m/x")))
    fleet.apply(Activation(node="a", event="stopping", at=0.0))
    assert fleet.routable("m/x") == []
    fleet.apply(beat("a", loaded("m/x"), draining=False))  # restarted and fresh
    assert fleet.routable("m/x")


def test_activation_from_an_unknown_node_waits_for_its_heartbeat() -> None:
    fleet = FleetView(Clock())
    fleet.apply(Activation(node="z", event="ready", model="m/x", at=0.0))
    assert fleet.model_ids() == []


def test_an_allow_list_ignores_other_nodes_and_counts_silent_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = FleetView(Clock(), allowed=["a", "quiet"])
    fleet.apply(beat("a", loaded("m/x")))
    fleet.apply(beat("intruder", loaded("m/x")))
    fleet.apply(beat("intruder", loaded("m/y")))
    fleet.apply(Activation(node="intruder", event="ready", model="m/z", at=0.0))
    assert [loc.node for loc in fleet.routable("m/x")] == ["a"]
    assert fleet.model_ids() == ["m/x"]
    assert fleet.health() == (1, 2)  # "quiet" is listed but never heartbeat
    assert caplog.text.count("ignoring neuron 'intruder'") == 1


def test_a_job_is_lost_once_a_heartbeat_well_after_its_silence_no_longer_lists_it() -> None:
    clock = Clock()
    fleet = FleetView(clock)
    silent_since = clock.now

    def listing(*jobs: str, interval_s: float = 1.0) -> None:
        fleet.apply(Heartbeat(node="a", seq=1, sent_at=0.0, interval_s=interval_s,
                              started_at=0.0, jobs=jobs))

    listing("j1")
    assert not fleet.lost_job("a", "j1", silent_since=silent_since)
    clock.now += LOST_AFTER_S - 0.5
    listing()  # too soon after the last event: it may have been read before the job's end
    assert not fleet.lost_job("a", "j1", silent_since=silent_since)
    clock.now += 0.5
    listing("j1")  # still held (a slow prefill): never lost for silence alone
    assert not fleet.lost_job("a", "j1", silent_since=silent_since)
    listing()
    assert fleet.lost_job("a", "j1", silent_since=silent_since)
    assert not fleet.lost_job("b", "j1", silent_since=silent_since)  # unknown node: not this rule
    fleet.apply(beat("a"))  # a neuron that does not list its jobs
    assert not fleet.lost_job("a", "j1", silent_since=silent_since)
    listing(interval_s=3.0)  # slow heartbeats: the margin is three of their intervals
    assert not fleet.lost_job("a", "j1", silent_since=silent_since)
    clock.now = silent_since + LOST_AFTER_BEATS * 3.0
    listing(interval_s=3.0)
    assert fleet.lost_job("a", "j1", silent_since=silent_since)
