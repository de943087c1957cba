"""The pure fleet rules: catalogue feasibility, priority, resolution and load specs (REFERENCE
§2.2, §5.2), eviction plans (§5.3), placement room and ranking (§5.2), and the parts of the fleet
view that placement and cold loads lean on (loading, staleness, draining, optimistic marks)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest

from bus_schema.messages import (
    Activation,
    ActivationState,
    Device,
    Heartbeat,
    ModelStatus,
    ResidentModel,
)
from cortex.catalogue import (
    DEFAULT_PRIORITY,
    PINNED_PRIORITY,
    Catalogue,
    compute_devices,
    is_feasible_on,
    load_spec,
)
from cortex.config import ModelEntry, ModelsConfig
from cortex.eviction import EvictionPlan, Resident, Strategy, candidates, plan
from cortex.fleet import FleetView
from cortex.placement import Candidate, device_room_mb, free_mb, rank

# --------------------------------------------------------------------------- helpers


def cuda(index: int, total_mb: int, *, free: int | None = None,
         budget: int | None = None) -> Device:
    return Device(index=index, kind="cuda", name=f"gpu{index}", memory_total_mb=total_mb,
                  memory_free_mb=total_mb if free is None else free, budget_mb=budget)


def cpu(index: int, total_mb: int = 131072, *, free: int | None = None,
        budget: int | None = None) -> Device:
    return Device(index=index, kind="cpu", name="cpu", memory_total_mb=total_mb,
                  memory_free_mb=total_mb if free is None else free, budget_mb=budget)


def entry(model: str = "Org/M", **kwargs: Any) -> ModelEntry:
    fields: dict[str, Any] = {"harness": "torch", **kwargs}
    return ModelEntry(id=model, **fields)


def resident(model: str, memory_mb: int, *, priority: int = 100, pinned: bool = False,
             used: float | None = None, loaded: float | None = 0.0) -> Resident:
    return Resident(model=model, memory_mb=memory_mb, priority=priority, pinned=pinned,
                    last_used_at=used, loaded_at=loaded)


def on(model: str, memory_mb: int | None, *devices: int,
       status: ModelStatus = "loaded") -> ResidentModel:
    return ResidentModel(id=model, status=status, memory_mb=memory_mb, devices=devices)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(node: str, *models: ResidentModel, draining: bool = False, jobs: int = 0,
         pending: Sequence[str] = (), in_progress: Sequence[str] = (),
         interval_s: float = 1.0) -> Heartbeat:
    return Heartbeat(
        node=node, seq=1, sent_at=0.0, interval_s=interval_s, started_at=0.0,
        devices=(cuda(0, 24000),), models=models, draining=draining, jobs_running=jobs,
        activation=ActivationState(state="pre_warming" if pending or in_progress else "ready",
                                   pending=tuple(pending), in_progress=tuple(in_progress)),
    )


NOW = 10_000.0
FLOOR = 60.0


def order(residents: Sequence[Resident], *, strategy: Strategy = "lru", newcomer: int = 100,
          now: float = NOW, floor: float = FLOOR) -> tuple[list[str], float | None]:
    found, protected = candidates(residents, strategy=strategy,
                                  newcomer_priority=newcomer, now=now, min_residency_s=floor)
    until = min(((r.loaded_at or 0.0) + floor for r in protected), default=None)
    return [r.model for r in found], until


def plan_for(residents: Sequence[Resident], *, need: int, free: int, strategy: Strategy = "lru",
             newcomer: int = 100, now: float = NOW, floor: float = FLOOR,
             max_victims: int = 3) -> EvictionPlan:
    return plan(residents, need_mb=need, free_mb=free, strategy=strategy,
                newcomer_priority=newcomer, now=now, min_residency_s=floor,
                max_victims=max_victims)


# --------------------------------------------------------------------------- catalogue: feasibility


def test_pinned_on_makes_a_profile_feasible_only_on_those_nodes() -> None:
    pinned = entry(pinned_on=["beast", "benjy"])
    devices = [cuda(0, 24000), cpu(1)]
    assert is_feasible_on(pinned, "beast", devices)
    assert is_feasible_on(pinned, "benjy", devices)
    assert not is_feasible_on(pinned, "other", devices)
    assert is_feasible_on(entry(), "other", devices)  # not pinned: anywhere


def test_min_devices_counts_only_accelerators_on_a_cuda_host() -> None:
    one_gpu = [cuda(0, 24000), cpu(1)]
    two_gpus = [cuda(0, 24000), cuda(1, 24000), cpu(2)]
    assert not is_feasible_on(entry(min_devices=2), "n", one_gpu)  # the CPU is no second device
    assert is_feasible_on(entry(min_devices=2), "n", two_gpus)
    assert not is_feasible_on(entry(min_devices=3), "n", two_gpus)


def test_a_cpu_only_host_offers_its_cpu_as_the_one_compute_device() -> None:
    host = [cpu(0)]
    assert compute_devices(host) == host
    assert is_feasible_on(entry(), "n", host)
    assert not is_feasible_on(entry(min_devices=2), "n", host)
    assert not is_feasible_on(entry(), "n", [])


def test_the_vram_floor_needs_min_devices_at_or_above_it() -> None:
    devices = [cuda(0, 16000), cuda(1, 24000), cuda(2, 24000), cpu(3)]
    assert is_feasible_on(entry(min_device_vram_mb=24000, min_devices=2), "n", devices)  # >=
    assert not is_feasible_on(entry(min_device_vram_mb=24001), "n", devices)
    mixed = [cuda(0, 16000), cuda(1, 24000), cpu(2)]
    assert is_feasible_on(entry(min_device_vram_mb=20000), "n", mixed)
    assert not is_feasible_on(entry(min_device_vram_mb=20000, min_devices=2), "n", mixed)
    assert is_feasible_on(entry(min_device_vram_mb=0, min_devices=2), "n", mixed)


def test_a_big_cpu_does_not_meet_the_floor_for_a_small_gpu() -> None:
    devices = [cuda(0, 8000), cpu(1, 262144)]
    assert not is_feasible_on(entry(min_device_vram_mb=20000), "n", devices)
    assert is_feasible_on(entry(min_device_vram_mb=20000), "n", [cpu(0, 262144)])


# --------------------------------------------------------------------------- catalogue: priority


def test_effective_priority_follows_residency_then_pinning_then_default() -> None:
    catalogue = Catalogue.of(ModelsConfig(models=[
        entry("a/explicit", residency_priority=500),
        entry("a/pinned", pinned_on=["beast"]),
        entry("a/pinned-low", pinned_on=["beast"], residency_priority=50),
        entry("a/zero", residency_priority=0),
        entry("a/plain"),
    ]))
    assert catalogue.priority("a/explicit") == 500
    assert catalogue.priority("a/pinned") == PINNED_PRIORITY == 1000
    assert catalogue.priority("a/pinned-low") == 50  # an explicit priority beats pinning
    assert catalogue.priority("a/zero") == 0  # zero is a value, not "unset"
    assert catalogue.priority("a/plain") == DEFAULT_PRIORITY == 100
    assert catalogue.priority("not/catalogued") == 100


# --------------------------------------------------------------------------- catalogue: resolve


def test_a_real_id_wins_over_an_alias_of_the_same_name() -> None:
    catalogue = Catalogue.of(ModelsConfig(
        models=[entry("Org/M"), entry("Org/Other")],
        aliases={"Org/M": "Org/Other", "Org/*": "Org/Other"},
    ))
    assert catalogue.resolve("Org/M") == "Org/M"
    assert catalogue.resolve("Org/Unknown") == "Org/Other"


def test_exact_aliases_come_before_globs_and_globs_go_in_file_order() -> None:
    catalogue = Catalogue.of(ModelsConfig(
        models=[entry("Qwen/Small"), entry("Qwen/Big"), entry("Qwen/Haiku")],
        aliases={
            "claude-*": "Qwen/Big",
            "claude-3-haiku": "Qwen/Haiku",
            "claude-?-sonnet*": "Qwen/Small",
            "helexa/small": "Qwen/Small",
            "gpt-[45]": "Qwen/Small",
        },
    ))
    assert catalogue.resolve("claude-3-haiku") == "Qwen/Haiku"  # exact beats an earlier glob
    assert catalogue.resolve("claude-3-sonnet-latest") == "Qwen/Big"  # first glob in file order
    assert catalogue.resolve("helexa/small") == "Qwen/Small"
    assert catalogue.resolve("gpt-4") == "Qwen/Small"
    assert catalogue.resolve("gpt-3") == "gpt-3"  # nothing matches: the name itself
    assert catalogue.resolve("Claude-3-opus") == "Claude-3-opus"  # globs are case-sensitive


def test_aliases_do_not_chain() -> None:
    catalogue = Catalogue.of(ModelsConfig(
        models=[entry("Org/M")], aliases={"a": "b", "b": "Org/M"},
    ))
    assert catalogue.resolve("a") == "b"


def test_the_first_of_duplicate_ids_wins() -> None:
    catalogue = Catalogue.of(ModelsConfig(models=[
        entry("Org/M", quant="first"), entry("Org/N"), entry("Org/M", quant="second"),
    ]))
    profile = catalogue.profile("Org/M")
    assert profile is not None and profile.quant == "first"
    assert sorted(catalogue.profiles) == ["Org/M", "Org/N"]
    assert catalogue.profile("Org/Missing") is None


# --------------------------------------------------------------------------- catalogue: load spec


def test_load_spec_carries_the_profile() -> None:
    spec = load_spec(entry("Qwen/Q", harness="llama", quant="Q4_K_M", vram_mb=54000,
                           source="helexa"), [cuda(0, 80000), cpu(1)], node="n")
    assert spec.model_id == "helexa:Qwen/Q"
    assert spec.harness == "llama" and spec.quant == "Q4_K_M"
    assert spec.memory_mb == 54000
    assert spec.tensor_parallel is None  # min_devices 1
    assert spec.devices == (0,)
    assert spec.pinned is False
    bare = load_spec(entry("Qwen/Q"), [cuda(0, 80000)], node="n")
    assert bare.model_id == "Qwen/Q" and bare.memory_mb is None and bare.quant is None


def test_tensor_parallel_only_above_one_device() -> None:
    devices = [cuda(0, 24000), cuda(1, 24000), cuda(2, 24000), cpu(3)]
    assert load_spec(entry(min_devices=1), devices, node="n").tensor_parallel is None
    spec = load_spec(entry(min_devices=2), devices, node="n")
    assert spec.tensor_parallel == 2 and spec.devices == (0, 1)


def test_load_spec_devices_are_the_first_at_or_above_the_floor() -> None:
    devices = [cuda(0, 16000), cuda(1, 24000), cuda(2, 8000), cuda(3, 24000), cpu(4)]
    spec = load_spec(entry(min_devices=2, min_device_vram_mb=24000), devices, node="n")
    assert spec.devices == (1, 3)
    one = load_spec(entry(min_device_vram_mb=20000), devices, node="n")
    assert one.devices == (1,)


def test_load_spec_falls_back_to_the_first_indices_when_too_few_qualify() -> None:
    # One GPU meets the floor; the big CPU entry must not make up the second device.
    devices = [cuda(0, 16000), cuda(1, 24000), cpu(2, 262144)]
    spec = load_spec(entry(min_devices=2, min_device_vram_mb=20000), devices, node="n")
    assert spec.devices == (0, 1)
    assert spec.tensor_parallel == 2


def test_load_spec_on_a_cpu_only_host_names_its_cpu() -> None:
    assert load_spec(entry(), [cpu(0)], node="n").devices == (0,)


def test_load_spec_is_pinned_only_on_a_pinned_node() -> None:
    profile = entry(pinned_on=["beast"])
    assert load_spec(profile, [cuda(0, 24000)], node="beast").pinned is True
    assert load_spec(profile, [cuda(0, 24000)], node="benjy").pinned is False


# --------------------------------------------------------------------------- eviction: candidates


def test_lru_evicts_the_never_used_first_then_the_oldest() -> None:
    residents = [
        resident("m/recent", 1, used=NOW - 10),
        resident("m/old", 1, used=NOW - 1000),
        resident("m/never-b", 1, used=None),
        resident("m/never-a", 1, used=None),
    ]
    assert order(residents) == (["m/never-a", "m/never-b", "m/old", "m/recent"], None)


def test_lru_ignores_priorities() -> None:
    residents = [
        resident("m/important", 1, priority=900, used=NOW - 1000),
        resident("m/cheap", 1, priority=1, used=NOW - 10),
    ]
    found, _ = order(residents, strategy="lru", newcomer=50)
    assert found == ["m/important", "m/cheap"]


def test_priority_displaces_only_strictly_lower_priorities() -> None:
    residents = [
        resident("m/lower", 1, priority=99, used=NOW - 10),
        resident("m/equal", 1, priority=100, used=None),
        resident("m/higher", 1, priority=500, used=None),
    ]
    assert order(residents, strategy="priority", newcomer=100) == (["m/lower"], None)
    assert order(residents, strategy="priority", newcomer=99) == ([], None)


def test_priority_goes_lowest_first_then_lru() -> None:
    residents = [
        resident("m/p50-recent", 1, priority=50, used=NOW - 1),
        resident("m/p10-recent", 1, priority=10, used=NOW - 1),
        resident("m/p50-never", 1, priority=50, used=None),
        resident("m/p50-old", 1, priority=50, used=NOW - 500),
        resident("m/p10-old", 1, priority=10, used=NOW - 500),
    ]
    found, _ = order(residents, strategy="priority", newcomer=100)
    assert found == ["m/p10-old", "m/p10-recent", "m/p50-never", "m/p50-old", "m/p50-recent"]


@pytest.mark.parametrize("strategy", ["lru", "priority"])
def test_pinned_models_are_never_candidates(strategy: Strategy) -> None:
    residents = [resident("m/pinned", 100, priority=0, pinned=True, used=None),
                 resident("m/free", 1, priority=0, used=NOW)]
    assert order(residents, strategy=strategy, newcomer=1000) == (["m/free"], None)
    assert plan_for(residents, need=50, free=0, strategy=strategy, newcomer=1000) == (
        EvictionPlan(displaceable_mb=1))


def test_the_residency_floor_protects_recent_loads_and_reports_the_earliest_end() -> None:
    residents = [
        resident("m/fresh", 1, loaded=NOW - 10),  # protected until NOW + 50
        resident("m/fresher", 1, loaded=NOW - 5),  # protected until NOW + 55
        resident("m/settled", 1, loaded=NOW - 600),
        resident("m/edge", 1, loaded=NOW - FLOOR),  # the floor ends exactly now: evictable
        resident("m/unknown-load", 1, loaded=None),  # no load time: not protected
    ]
    found, until = order(residents)
    assert sorted(found) == ["m/edge", "m/settled", "m/unknown-load"]
    assert until == NOW + 50
    assert order(residents, floor=0.0) == (
        ["m/edge", "m/fresh", "m/fresher", "m/settled", "m/unknown-load"], None)


def test_the_floor_is_not_reported_for_models_the_newcomer_may_not_displace() -> None:
    residents = [resident("m/higher", 1, priority=500, loaded=NOW - 1)]
    assert order(residents, strategy="priority", newcomer=100) == ([], None)
    assert order(residents, strategy="lru", newcomer=100) == ([], NOW - 1 + FLOOR)


# --------------------------------------------------------------------------- eviction: plan


def test_nothing_is_evicted_when_the_newcomer_already_fits() -> None:
    residents = [resident("m/a", 300), resident("m/b", 200), resident("m/fresh", 50, loaded=NOW)]
    assert plan_for(residents, need=100, free=100) == EvictionPlan(displaceable_mb=500)


def test_a_plan_evicts_in_order_only_as_many_as_needed() -> None:
    residents = [
        resident("m/a", 3, used=1.0),
        resident("m/b", 4, used=2.0),
        resident("m/c", 5, used=3.0),
        resident("m/d", 100, used=4.0),
    ]
    assert plan_for(residents, need=10, free=2) == EvictionPlan(
        victims=("m/a", "m/b", "m/c"), freed_mb=12, displaceable_mb=112)
    assert plan_for(residents, need=9, free=2) == EvictionPlan(  # an exact fit is enough
        victims=("m/a", "m/b"), freed_mb=7, displaceable_mb=112)


def test_at_most_three_victims_then_nothing() -> None:
    residents = [resident(f"m/{i}", 10, used=float(i)) for i in range(5)]
    assert plan_for(residents, need=40, free=5) == EvictionPlan(displaceable_mb=50)
    assert plan_for(residents, need=35, free=5).victims == ("m/0", "m/1", "m/2")
    assert plan_for(residents, need=40, free=5, max_victims=4).victims == (
        "m/0", "m/1", "m/2", "m/3")


def test_nothing_is_evicted_when_the_newcomer_cannot_fit_anyway() -> None:
    residents = [resident("m/a", 10), resident("m/b", 10)]
    result = plan_for(residents, need=100, free=50)
    assert result == EvictionPlan(displaceable_mb=20)
    assert result.victims == () and result.freed_mb == 0 and result.protected_until is None


def test_the_floor_is_reported_only_when_nothing_else_frees_enough() -> None:
    residents = [resident("m/old", 40, used=1.0), resident("m/fresh", 100, loaded=NOW - 20)]
    enough = plan_for(residents, need=50, free=20)
    assert enough == EvictionPlan(victims=("m/old",), freed_mb=40, displaceable_mb=40)
    blocked = plan_for(residents, need=100, free=20)
    assert blocked == EvictionPlan(protected_until=NOW + 40, displaceable_mb=40)


def test_priority_plan_evicts_only_lower_priorities() -> None:
    residents = [
        resident("m/vip", 100, priority=900, used=None),
        resident("m/low", 30, priority=10, used=NOW - 1),
        resident("m/mid", 30, priority=50, used=None),
    ]
    result = plan_for(residents, need=50, free=0, strategy="priority", newcomer=100)
    assert result == EvictionPlan(victims=("m/low", "m/mid"), freed_mb=60, displaceable_mb=60)
    assert plan_for(residents, need=100, free=0, strategy="priority", newcomer=100) == (
        EvictionPlan(displaceable_mb=60))
    lru = plan_for(residents, need=100, free=0, strategy="lru", newcomer=100)
    assert lru.victims == ("m/mid", "m/vip")  # never used first, priorities ignored


# --------------------------------------------------------------------------- placement: room


def test_without_a_budget_the_room_is_the_physical_free_memory() -> None:
    device = cuda(0, 24000, free=9000, budget=None)
    assert device_room_mb(device, [on("m/x", 20000, 0)]) == 9000


def test_the_room_is_the_budget_less_the_models_on_that_device() -> None:
    device = cuda(0, 80000, free=80000, budget=40000)
    models = [on("m/here", 10000, 0), on("m/there", 25000, 1), on("m/both", 5000, 0, 1),
              on("m/unsized", None, 0)]
    assert device_room_mb(device, models) == 25000


def test_a_model_without_device_indices_counts_against_every_device() -> None:
    device = cuda(1, 80000, free=80000, budget=40000)
    assert device_room_mb(device, [on("m/anywhere", 10000)]) == 30000


def test_the_room_never_exceeds_the_physical_free_memory_nor_drops_below_zero() -> None:
    assert device_room_mb(cuda(0, 80000, free=5000, budget=40000), [on("m/x", 10000, 0)]) == 5000
    assert device_room_mb(cuda(0, 80000, free=80000, budget=40000),
                          [on("m/x", 50000, 0)]) == 0


def test_free_mb_is_the_roomiest_compute_device_and_ignores_a_cuda_hosts_cpu() -> None:
    devices = [cuda(0, 24000, budget=20000), cuda(1, 24000, budget=20000),
               cpu(2, 262144, budget=200000)]
    models = [on("m/a", 15000, 0), on("m/b", 4000, 1)]
    assert free_mb(devices, models) == 16000
    assert free_mb([cpu(0, 65536, free=30000, budget=50000)], [on("m/c", 10000, 0)]) == 30000
    assert free_mb([cpu(0, 65536, free=60000, budget=50000)], [on("m/c", 10000, 0)]) == 40000
    assert free_mb([], []) == 0


# --------------------------------------------------------------------------- placement: rank


def cand(node: str, *, pinned: bool = False, fits_free: bool = False,
         fits_after_evict: bool = False, room: int = 0) -> Candidate:
    return Candidate(node=node, pinned=pinned, fits_free=fits_free,
                     fits_after_evict=fits_after_evict, free_mb=room)


def test_rank_orders_pinned_fits_free_fits_after_evict_room_then_name() -> None:
    ranked = rank([
        cand("roomy-b", room=900),
        cand("roomy-a", room=900),
        cand("small", room=10),
        cand("evict", fits_after_evict=True, room=5),
        cand("free", fits_free=True, fits_after_evict=True, room=100),
        cand("free-more", fits_free=True, fits_after_evict=True, room=200),
        cand("pinned", pinned=True, room=0),
    ])
    assert [c.node for c in ranked] == [
        "pinned", "free-more", "free", "evict", "roomy-a", "roomy-b", "small"]
    assert rank([]) == []


# --------------------------------------------------------------------------- fleet view


def test_a_heartbeat_with_a_loading_model_shows_in_loading_on() -> None:
    fleet = FleetView(Clock())
    fleet.apply(beat("a", on("Org/M", None, status="loading")))
    fleet.apply(beat("b", on("Org/M", 100, 0)))
    fleet.apply(beat("c", on("Org/R", None, status="recovering")))
    assert fleet.loading_on("Org/M") == ["a"]  # loaded is not loading
    assert fleet.loading_on("Org/R") == ["c"]
    assert fleet.loading_on("Org/X") == []


def test_activation_lists_count_as_loading_with_or_without_a_scheme() -> None:
    fleet = FleetView(Clock())
    fleet.apply(beat("a", pending=["helexa:Org/M"]))
    fleet.apply(beat("b", in_progress=["Org/M"]))
    fleet.apply(beat("c", pending=["huggingface:Org/Other"]))
    assert fleet.loading_on("Org/M") == ["a", "b"]
    assert fleet.loading_on("helexa:Org/M") == []
    assert fleet.loading_on("Org/Other") == ["c"]


def test_stale_nodes_leave_health_loading_and_routing() -> None:
    clock = Clock()
    fleet = FleetView(clock)
    fleet.apply(beat("old", on("Org/M", 1, 0), on("Org/L", None, status="loading"),
                     pending=["helexa:Org/P"]))
    clock.now += 2.0
    fleet.apply(beat("new", on("Org/M", 1, 0)))
    clock.now += 1.5  # "old" silent for 3.5 intervals, "new" for 1.5
    assert [n.name for n in fleet.healthy_nodes()] == ["new"]
    assert [loc.node for loc in fleet.routable("Org/M")] == ["new"]
    assert fleet.loading_on("Org/L") == []
    assert fleet.loading_on("Org/P") == []
    assert not fleet.is_healthy("old") and fleet.is_healthy("new")
    fleet.apply(beat("old", on("Org/M", 1, 0)))  # heard again: back
    assert [n.name for n in fleet.healthy_nodes()] == ["new", "old"]


def test_the_stale_threshold_scales_with_the_heartbeat_interval() -> None:
    clock = Clock()
    fleet = FleetView(clock)
    fleet.apply(beat("slow", on("Org/M", 1, 0), interval_s=10.0))
    clock.now += 29.0
    assert fleet.routable("Org/M")
    clock.now += 2.0
    assert fleet.routable("Org/M") == []


def test_mark_loaded_makes_a_model_routable_before_the_next_heartbeat() -> None:
    fleet = FleetView(Clock())
    calls: list[str] = []
    fleet.apply(beat("a", on("Org/M", None, status="loading")))
    fleet.listen(lambda: calls.append("changed"))
    assert fleet.routable("Org/M") == []
    before = time.time()
    fleet.mark_loaded("a", "Org/M", memory_mb=4096, pinned=True)
    assert calls == ["changed"]
    assert [loc.node for loc in fleet.routable("Org/M")] == ["a"]
    assert fleet.loading_on("Org/M") == []
    view = fleet.node("a")
    assert view is not None
    model = view.models["Org/M"]
    assert model.status == "loaded" and model.memory_mb == 4096 and model.pinned
    assert model.load_progress is None
    assert model.loaded_at is not None and model.loaded_at >= before


def test_mark_loaded_adds_a_model_the_node_never_reported() -> None:
    fleet = FleetView(Clock())
    fleet.apply(beat("a"))
    fleet.mark_loaded("a", "Org/New", memory_mb=None, pinned=False)
    assert [loc.node for loc in fleet.routable("Org/New")] == ["a"]
    assert fleet.model_ids() == ["Org/New"]


def test_mark_loaded_on_an_unknown_node_changes_nothing() -> None:
    fleet = FleetView(Clock())
    calls: list[str] = []
    fleet.listen(lambda: calls.append("changed"))
    fleet.mark_loaded("ghost", "Org/M", memory_mb=1, pinned=False)
    assert calls == [] and fleet.routable("Org/M") == [] and fleet.model_ids() == []


def test_forget_model_removes_it_and_tells_listeners_once() -> None:
    fleet = FleetView(Clock())
    fleet.apply(beat("a", on("Org/M", 1, 0), on("Org/N", 1, 0)))
    calls: list[str] = []
    fleet.listen(lambda: calls.append("changed"))
    fleet.forget_model("a", "Org/M")
    assert calls == ["changed"]
    assert fleet.routable("Org/M") == [] and fleet.locations("Org/M") == []
    assert fleet.routable("Org/N")
    fleet.forget_model("a", "Org/M")  # already gone
    fleet.forget_model("ghost", "Org/N")
    assert calls == ["changed"]


def test_heartbeats_and_activations_call_every_listener() -> None:
    fleet = FleetView(Clock())
    calls: list[str] = []
    fleet.listen(lambda: calls.append("first"))
    fleet.listen(lambda: calls.append("second"))
    fleet.apply(beat("a"))
    fleet.apply(Activation(node="a", event="ready", model="Org/M", at=0.0))
    assert calls == ["first", "second", "first", "second"]


def test_draining_nodes_are_not_healthy() -> None:
    fleet = FleetView(Clock())
    fleet.apply(beat("by-heartbeat", on("Org/M", 1, 0), draining=True,
                     pending=["helexa:Org/P"]))
    fleet.apply(beat("by-activation", on("Org/M", 1, 0)))
    fleet.apply(beat("fine", on("Org/M", 1, 0)))
    fleet.apply(Activation(node="by-activation", event="draining", at=0.0))
    assert [n.name for n in fleet.healthy_nodes()] == ["fine"]
    assert [loc.node for loc in fleet.routable("Org/M")] == ["fine"]
    assert fleet.loading_on("Org/P") == []
    locations = {loc.node: loc.healthy for loc in fleet.locations("Org/M")}
    assert locations == {"by-activation": False, "by-heartbeat": False, "fine": True}


def test_the_floor_promises_no_retry_when_even_the_protected_models_cannot_make_room() -> None:
    recent = resident("m/recent", 10, loaded=NOW - 1)
    hopeless = plan_for([recent], need=100, free=0)
    assert hopeless == EvictionPlan()
    hopeful = plan_for([recent], need=10, free=0)
    assert hopeful.victims == () and hopeful.protected_until == NOW - 1 + FLOOR


def test_mark_loaded_keeps_a_known_size_and_devices_when_the_reply_has_none() -> None:
    fleet = FleetView(Clock())
    fleet.apply(beat("a", on("Org/M", 9000, 1, status="loading")))
    fleet.mark_loaded("a", "Org/M", memory_mb=None, pinned=False)
    view = fleet.node("a")
    assert view is not None
    assert view.models["Org/M"].memory_mb == 9000
    assert view.models["Org/M"].devices == (1,)
