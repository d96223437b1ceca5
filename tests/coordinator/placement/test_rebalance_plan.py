"""The rebalancer's planner: the fewest moves, checked against a brute force over every
placement of small random clusters, with an independent rule checker."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Mapping

from cluster_builders import affinity, anti, host, snapshot, vm
from hvplace.coordinator.placement.rebalance import moved_snapshot, plan_rebalance
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import VM, Enforcement, HostState, Rule, RuleKind
from hypothesis import given, settings
from hypothesis import strategies as st

# --------------------------------------------------------------------------- independent checker


def _members(rule: Rule, vms: Mapping[str, VM]) -> list[str]:
    return sorted(k for k, v in vms.items() if rule.selects(v))


def _rule_holds(rule: Rule, snap: Snapshot, where: Mapping[str, str]) -> bool:
    placed = [m for m in _members(rule, snap.vms) if m in where]
    domains: list[str | None] = []
    for m in placed:
        h = snap.hosts[where[m]]
        domains.append(h.name if rule.topology_key == "host" else h.labels.get(rule.topology_key))
    if any(d is None for d in domains):
        return False
    per = Counter(domains)
    if rule.kind is RuleKind.AFFINITY:
        return len(per) <= 1
    if any(c > rule.max_per_domain for c in per.values()):
        return False
    want = min(rule.min_domains, len(_members(rule, snap.vms))) if rule.min_domains > 1 else 0
    return len(per) >= min(want, len(placed))


def _valid(snap: Snapshot, where: Mapping[str, str]) -> bool:
    """Every required rule holds and no host that receives a VM is over capacity."""
    for rule in snap.rules.values():
        if rule.required and not _rule_holds(rule, snap, where):
            return False
    used: dict[str, list[int]] = {}
    for key, h in where.items():
        r = snap.vms[key].resources
        u = used.setdefault(h, [0, 0, 0])
        u[0] += r.vcpus
        u[1] += r.memory_mib
        u[2] += r.disk_gib
    for h, u in used.items():
        if where_changed_into(snap, where, h):
            a = snap.hosts[h].allocatable()
            if u[0] > a.vcpus or u[1] > a.memory_mib or u[2] > a.disk_gib:
                return False
    return True


def where_changed_into(snap: Snapshot, where: Mapping[str, str], h: str) -> bool:
    return any(where[k] == h and snap.placements[k] != h for k in where)


def _brute_minimum(snap: Snapshot) -> int | None:
    """The fewest VMs whose host changes, over every placement; moves go to ready hosts."""
    keys = sorted(snap.placements)
    ready = sorted(h for h, x in snap.hosts.items() if x.state is HostState.READY)
    best: int | None = None
    options = [sorted({snap.placements[k], *ready}) for k in keys]
    for combo in itertools.product(*options):
        where = dict(zip(keys, combo, strict=True))
        moved = sum(1 for k in keys if where[k] != snap.placements[k])
        if best is not None and moved >= best:
            continue
        if _valid(snap, where):
            best = moved
    return best


# --------------------------------------------------------------------------- random clusters


@st.composite
def broken_clusters(draw: st.DrawFn) -> Snapshot:
    n_hosts = draw(st.integers(2, 4))
    hosts = [
        host(
            f"h{i}",
            cpu=draw(st.integers(2, 4)),
            mem=8192,
            state=draw(st.sampled_from([HostState.READY] * 5 + [HostState.CORDONED])),
            rack=f"r{i % 2}",
        )
        for i in range(n_hosts)
    ]
    n_vms = draw(st.integers(2, 6))
    vms = [vm(f"v{i}", cpu=draw(st.integers(1, 2)), mem=512) for i in range(n_vms)]
    placements = {v.key: f"h{draw(st.integers(0, n_hosts - 1))}" for v in vms}
    rules: list[Rule] = []
    names = [v.name for v in vms]
    free = list(names)
    for r in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["anti", "aff"]))
        if len(free) < 2:
            break
        members = draw(st.lists(st.sampled_from(free), min_size=2, max_size=4, unique=True))
        for m in members:
            free.remove(m)  # one rule per VM keeps rules from contradicting each other
        enforcement = draw(st.sampled_from([Enforcement.REQUIRED] * 3 + [Enforcement.PREFERRED]))
        weight = 50 if enforcement is Enforcement.PREFERRED else 0
        if kind == "anti":
            rules.append(
                anti(
                    f"r{r}",
                    *members,
                    topology_key=draw(st.sampled_from(["host", "host", "rack"])),
                    max_per_domain=draw(st.integers(1, 2)),
                    enforcement=enforcement,
                    weight=weight,
                )
            )
        else:
            rules.append(affinity(f"r{r}", *members, enforcement=enforcement, weight=weight))
    return snapshot(hosts, vms, placements, rules)


@settings(max_examples=300, deadline=None)
@given(broken_clusters())
def test_repair_uses_the_brute_force_minimum_of_moves(snap: Snapshot) -> None:
    plan = plan_rebalance(snap, improve=False)
    best = _brute_minimum(snap)
    after = moved_snapshot(snap, plan.moves)
    if best is None:
        # Nothing repairs every required rule: the plan says which stay broken.
        assert plan.unrepaired
        return
    assert plan.minimal
    assert not plan.unrepaired
    assert len(plan.moves) == plan.repair_moves == best
    assert _valid(snap, after.placements)
    for m in plan.moves:
        assert snap.hosts[m.target].state is HostState.READY
        assert snap.placements[m.vm] == m.source != m.target


@settings(max_examples=150, deadline=None)
@given(broken_clusters(), st.integers(1, 3))
def test_improvements_never_break_a_required_rule_and_respect_the_budget(
    snap: Snapshot, budget: int
) -> None:
    plan = plan_rebalance(snap, max_moves=budget)
    assert len(plan.moves) <= budget
    after = moved_snapshot(snap, plan.moves)
    if not plan.unrepaired and not plan.truncated:
        assert _valid(snap, after.placements)
    # Improvements never break a required rule the repairs left holding.
    repaired = moved_snapshot(snap, plan.moves[: plan.repair_moves])
    for rule in snap.rules.values():
        if rule.required and _rule_holds(rule, snap, repaired.placements):
            assert _rule_holds(rule, snap, after.placements)


def test_anti_affinity_three_on_one_host_moves_two() -> None:
    hosts = [host("h0"), host("h1"), host("h2")]
    vms = [vm("a"), vm("b"), vm("c"), vm("d")]
    snap = snapshot(
        hosts,
        vms,
        {"t1/a": "h0", "t1/b": "h0", "t1/c": "h0", "t1/d": "h1"},
        [anti("db", "a", "b", "c")],
    )
    plan = plan_rebalance(snap)
    assert plan.minimal and plan.repair_moves == 2 and not plan.unrepaired
    assert {m.vm for m in plan.moves} <= {"t1/a", "t1/b", "t1/c"}
    assert plan.broken == ("t1/db",)


def test_degraded_member_is_the_one_moved() -> None:
    hosts = [host("h0"), host("h1")]
    snap = snapshot(hosts, [vm("a"), vm("b")], {"t1/a": "h0", "t1/b": "h0"}, [anti("x", "a", "b")])
    snap = dataclasses.replace(snap, degraded={"t1/b": ("t1/x",)})
    plan = plan_rebalance(snap)
    assert [(m.vm, m.target) for m in plan.moves] == [("t1/b", "h1")]


def test_fewest_moves_with_full_hosts() -> None:
    # Affinity a+b split over h0 and h1, each full.
    hosts = [host("h0", cpu=2), host("h1", cpu=2), host("h2", cpu=2)]
    vms = [vm("a"), vm("b"), vm("c"), vm("d")]
    snap = snapshot(
        hosts,
        vms,
        {"t1/a": "h0", "t1/d": "h0", "t1/b": "h1", "t1/c": "h1"},
        [affinity("pair", "a", "b")],
    )
    plan = plan_rebalance(snap)
    # Two moves either way (a and b to h2, or c to h2 and a into its room).
    assert plan.repair_moves == 2 and plan.minimal
    after = moved_snapshot(snap, plan.moves)
    assert _valid(snap, after.placements)


def test_no_repair_possible_is_reported() -> None:
    hosts = [host("h0"), host("h1", state=HostState.CORDONED)]
    snap = snapshot(hosts, [vm("a"), vm("b")], {"t1/a": "h0", "t1/b": "h0"}, [anti("x", "a", "b")])
    plan = plan_rebalance(snap)
    assert (
        not plan.moves and "t1/x" in plan.unrepaired and "share host h0" in plan.unrepaired["t1/x"]
    )


def test_preferred_rule_improved_within_budget() -> None:
    hosts = [host("h0"), host("h1"), host("h2")]
    vms = [vm("a"), vm("b"), vm("c")]
    pref = anti("soft", "a", "b", "c", enforcement=Enforcement.PREFERRED, weight=10)
    snap = snapshot(hosts, vms, dict.fromkeys(("t1/a", "t1/b", "t1/c"), "h0"), [pref])
    assert len(plan_rebalance(snap, max_moves=1).moves) == 1
    plan = plan_rebalance(snap)
    assert len(plan.moves) == 2 and plan.improved == ("t1/soft",)
    assert plan_rebalance(snap, improve=False).moves == ()


def test_vms_on_lost_or_degraded_hosts_stay() -> None:
    hosts = [host("h0", state=HostState.LOST), host("h1"), host("h2")]
    snap = snapshot(hosts, [vm("a"), vm("b")], {"t1/a": "h0", "t1/b": "h0"}, [anti("x", "a", "b")])
    assert plan_rebalance(snap).moves == ()
