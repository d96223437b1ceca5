"""Invariants over random clusters, rules and batches, checked by an independent checker."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping

import immutables
from hvplace.coordinator.failure import replace_lost
from hvplace.coordinator.placement import Batch, check_admission, explain, place
from hvplace.coordinator.placement.admission import check_admission_full
from hvplace.coordinator.snapshot import Derived, Snapshot, Usage
from hvplace.proto.records import (
    VM,
    Enforcement,
    Host,
    HostState,
    OnFailure,
    Resources,
    Rule,
    RuleKind,
    ScopePolicy,
)
from hvplace.proto.selectors import (
    LabelExpression,
    LabelSelector,
    NodeAffinity,
    NodeSelectorTerm,
    Op,
)
from hypothesis import given, settings
from hypothesis import strategies as st

SCOPES = ("s1", "s2")
ZONES = ("za", "zb", "zc")


@st.composite
def clusters(draw: st.DrawFn) -> tuple[Snapshot, list[VM], list[VM]]:
    n_hosts = draw(st.integers(1, 7))
    hosts = {}
    for i in range(n_hosts):
        labels = {"rack": f"r{i % 3}"}
        if draw(st.booleans()):
            labels["zone"] = draw(st.sampled_from(ZONES))
        state = draw(st.sampled_from([HostState.READY] * 4 + [HostState.CORDONED, HostState.LOST]))
        hosts[f"h{i}"] = Host(
            name=f"h{i}",
            labels=labels,
            capacity=Resources(draw(st.integers(2, 8)), draw(st.integers(2048, 8192)), 100),
            state=state,
        )
    vms: list[VM] = []
    for i in range(draw(st.integers(1, 14))):
        scope = draw(st.sampled_from(SCOPES))
        labels = {"app": draw(st.sampled_from(["db", "web", "cache"]))}
        affinity = NodeAffinity()
        if draw(st.integers(0, 4)) == 0:
            affinity = NodeAffinity(
                required=(
                    NodeSelectorTerm(
                        (LabelExpression("rack", Op.IN, (draw(st.sampled_from(["r0", "r1"])),)),)
                    ),
                )
            )
        vms.append(
            VM(
                scope=scope,
                name=f"v{i}",
                labels=labels,
                resources=Resources(draw(st.integers(1, 3)), draw(st.integers(256, 3072)), 5),
                node_affinity=affinity,
            )
        )
    rules: dict[str, Rule] = {}
    for r in range(draw(st.integers(0, 4))):
        scope = draw(st.sampled_from(SCOPES))
        names = [v.name for v in vms if v.scope == scope]
        kind = draw(st.sampled_from(list(RuleKind)))
        selector = None
        members: tuple[str, ...] = ()
        if draw(st.booleans()) or len(names) < 2:
            selector = LabelSelector(match_labels={"app": draw(st.sampled_from(["db", "web"]))})
        else:
            members = tuple(draw(st.lists(st.sampled_from(names), min_size=2, unique=True)))
        preferred = draw(st.integers(0, 3)) == 0
        anti = kind is RuleKind.ANTI_AFFINITY
        rule = Rule(
            scope=scope,
            name=f"r{r}",
            kind=kind,
            enforcement=Enforcement.PREFERRED if preferred else Enforcement.REQUIRED,
            weight=10 if preferred else 0,
            members=members,
            selector=selector,
            topology_key=draw(st.sampled_from(["host", "host", "rack", "zone"])),
            max_per_domain=draw(st.integers(1, 2)) if anti else 1,
            min_domains=draw(st.integers(0, 3)) if anti else 0,
            on_failure=draw(st.sampled_from(list(OnFailure))),
        )
        rules[rule.key] = rule
    policies = {}
    for scope in SCOPES:
        if draw(st.booleans()):
            policies[scope] = ScopePolicy(
                scope, label_anti_affinity=True, spread=draw(st.integers(0, 3))
            )
    split = draw(st.integers(0, len(vms)))
    snap = Snapshot(revision=1, hosts=hosts, rules=rules, policies=policies)
    return snap, vms[:split], vms[split:]


def _with(snap: Snapshot, vms: list[VM], assignments: Mapping[str, str]) -> Snapshot:
    all_vms = dict(snap.vms)
    all_vms.update((v.key, v) for v in vms)
    placements = dict(snap.placements)
    placements.update(assignments)
    return Snapshot(
        revision=snap.revision + 1,
        hosts=snap.hosts,
        vms=all_vms,
        placements=placements,
        rules=snap.rules,
        policies=snap.policies,
    )


def broken_required_rules(
    snap: Snapshot, skip: Mapping[str, tuple[str, ...]] | None = None, spread: bool = True
) -> list[str]:
    """Brute force, written apart from the engine: every required rule and policy group,
    and host capacity. `skip` lists (VM → rule keys) knowingly degraded; `spread=False`
    leaves out min_domains, which a host failure itself can break by removing members."""
    skip = skip or {}
    problems: list[str] = []
    used: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for key, host in snap.placements.items():
        r = snap.vms[key].resources
        u = used[host]
        u[0] += r.vcpus
        u[1] += r.memory_mib
        u[2] += r.disk_gib
    for name, (cpu, mem, disk) in used.items():
        a = snap.hosts[name].allocatable()
        if cpu > a.vcpus or mem > a.memory_mib or disk > a.disk_gib:
            problems.append(f"host {name} over capacity")
    groups: list[tuple[str, str, list[str], int, int, bool]] = []
    for rule in snap.rules.values():
        if not rule.required:
            continue
        members = [
            v.key
            for v in snap.vms.values()
            if v.scope == rule.scope
            and (
                v.name in rule.members
                or (rule.selector is not None and rule.selector.matches(v.labels))
            )
        ]
        groups.append(
            (
                rule.key,
                rule.topology_key,
                members,
                rule.max_per_domain,
                rule.min_domains,
                rule.kind is RuleKind.ANTI_AFFINITY,
            )
        )
    for policy in snap.policies.values():
        if not policy.label_anti_affinity:
            continue
        pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
        for v in snap.vms.values():
            if v.scope == policy.scope:
                for kv in v.labels.items():
                    pairs[kv].append(v.key)
        for (k, val), members in pairs.items():
            cap = 10**9 if policy.spread else 1
            groups.append(
                (f"{policy.scope}/label:{k}={val}", "host", members, cap, policy.spread, True)
            )
    for key, topo, members, cap, min_domains, is_anti in groups:
        placed = [m for m in members if m in snap.placements and key not in skip.get(m, ())]
        domains = []
        for m in placed:
            d = snap.hosts[snap.placements[m]].topology(topo)
            if d is None:
                problems.append(f"{key}: {m} on a host without {topo}")
            else:
                domains.append(d)
        per = Counter(domains)
        if is_anti:
            if any(c > cap for c in per.values()):
                problems.append(f"{key}: over {cap} per {topo}: {per}")
            need = min(min_domains, len(members), len(placed)) if min_domains > 1 else 0
            if spread and len(per) < need:
                problems.append(f"{key}: {len(per)} {topo}s < {need}")
        elif len(per) > 1:
            problems.append(f"{key}: affinity split {per}")
    return problems


@settings(max_examples=150, deadline=None)
@given(clusters(), st.booleans())
def test_no_required_rule_broken_no_host_over_capacity(
    cluster: tuple[Snapshot, list[VM], list[VM]], atomic: bool
) -> None:
    snap, first, second = cluster
    plan = place(snap, Batch(tuple(first)))
    snap = _with(snap, first, plan.assignments)
    assert broken_required_rules(snap) == []
    plan = place(snap, Batch(tuple(second), atomic=atomic))
    for host in plan.assignments.values():
        assert snap.hosts[host].state is HostState.READY
    assert set(plan.assignments) | set(plan.pending) == {v.key for v in second}
    if atomic:
        assert plan.assignments == {} or len(plan.assignments) == len(second)
    snap = _with(snap, second, plan.assignments)
    assert broken_required_rules(snap) == []


@settings(max_examples=100, deadline=None)
@given(clusters())
def test_same_input_same_plan_whatever_the_mapping_order(
    cluster: tuple[Snapshot, list[VM], list[VM]],
) -> None:
    snap, first, second = cluster
    batch = Batch(tuple(first + second))
    reordered = Snapshot(
        revision=snap.revision,
        hosts=dict(reversed(list(snap.hosts.items()))),
        rules=dict(reversed(list(snap.rules.items()))),
        policies=dict(reversed(list(snap.policies.items()))),
    )
    one = place(snap, batch)
    assert one == place(snap, batch)
    assert one == place(reordered, batch)


@settings(max_examples=100, deadline=None)
@given(clusters(), st.data())
def test_failover_keeps_every_block_rule_and_capacity(
    cluster: tuple[Snapshot, list[VM], list[VM]], data: st.DataObject
) -> None:
    snap, first, second = cluster
    vms = first + second
    plan = place(snap, Batch(tuple(vms)))
    snap = _with(snap, vms, plan.assignments)
    hosts_in_use = sorted(set(snap.placements.values()))
    if not hosts_in_use:
        return
    lost = data.draw(st.lists(st.sampled_from(hosts_in_use), min_size=1, max_size=2, unique=True))
    after = replace_lost(snap, lost)
    assert not set(after.assignments.values()) & set(lost)
    survivors = {k: h for k, h in snap.placements.items() if h not in lost}
    survivors.update(after.assignments)
    result = Snapshot(
        revision=2,
        hosts=snap.hosts,
        vms=snap.vms,
        placements=survivors,
        rules=snap.rules,
        policies=snap.policies,
    )
    for vm_key, broken in after.degraded.items():
        for rule_key in broken:
            assert snap.rules[rule_key].on_failure is OnFailure.DEGRADE, (vm_key, rule_key)
    assert broken_required_rules(result, after.degraded, spread=False) == []
    moved = {k for k, h in snap.placements.items() if h in lost}
    assert set(after.assignments) | set(after.pending) == moved


@settings(max_examples=150, deadline=None)
@given(clusters(), st.integers(1, 2), st.sampled_from(["host", "rack"]))
def test_admission_shortcut_answers_as_the_full_simulation(
    cluster: tuple[Snapshot, list[VM], list[VM]], failures: int, topology: str
) -> None:
    """The capacity-slot shortcut may only skip simulations whose answer it knows."""
    snap, first, second = cluster
    plan = place(snap, Batch(tuple(first)))
    snap = _with(snap, first, plan.assignments)
    kw = {"failures": failures, "topology_key": topology, "extra_vms": second}
    fast = check_admission(snap, **kw)  # type: ignore[arg-type]
    full = check_admission(snap, exact=True, **kw)  # type: ignore[arg-type]
    assert fast.ok == full.ok
    assert {i.failed: i.stranded for i in fast.impacts} == {
        i.failed: i.stranded for i in full.impacts
    }


def _counted(snap: Snapshot, in_flight: int) -> Snapshot:
    """`snap` as the coordinator's cache serves it: immutable maps with the counters
    (snapshot.Usage) moved one record at a time, and its last `in_flight` placements laid
    over them as the planner lays plans still in flight."""
    usage = Usage()
    placed = sorted(snap.placements.items())
    kept = placed[: len(placed) - in_flight] if in_flight else placed
    for key, vm in snap.vms.items():
        usage.set_vm(key, vm)
    for key, host in kept:
        usage.set_placement(key, host)
    base = Snapshot(
        revision=snap.revision,
        hosts=immutables.Map(snap.hosts),
        vms=usage.vms,
        placements=usage.placements,
        rules=snap.rules,
        policies=snap.policies,
        derived=Derived.of(usage),
    )
    flying = dict(placed[len(kept) :])
    counted = base.overlaid({k: snap.vms[k] for k in flying if k in snap.vms}, flying)
    assert counted.usage() is not None
    return counted


@settings(max_examples=150, deadline=None)
@given(clusters(), st.integers(1, 2), st.sampled_from(["host", "rack"]), st.integers(0, 3))
def test_counted_admission_answers_as_the_full_simulation_oracle(
    cluster: tuple[Snapshot, list[VM], list[VM]], failures: int, topology: str, in_flight: int
) -> None:
    """Issue 14: admission and placement read the counters kept per event (and the
    overlay of plans in flight) and answer as the former whole computation does."""
    snap, first, second = cluster
    plan = place(snap, Batch(tuple(first)))
    snap = _with(snap, first, plan.assignments)
    counted = _counted(snap, in_flight)
    assert place(counted, Batch(tuple(second))) == place(snap, Batch(tuple(second)))
    kw = {"failures": failures, "topology_key": topology, "extra_vms": second}
    fast = check_admission(counted, **kw)  # type: ignore[arg-type]
    oracle = check_admission_full(snap, **kw)  # type: ignore[arg-type]
    assert fast.ok == oracle.ok
    assert fast.scenarios == oracle.scenarios
    assert {i.failed: i.stranded for i in fast.impacts} == {
        i.failed: i.stranded for i in oracle.impacts
    }
    if second:
        vm = second[0]
        assert explain(counted, vm) == explain(snap, vm)
