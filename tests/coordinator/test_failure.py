"""replace_lost: VMs of lost hosts re-placed by HA priority, block vs degrade."""

from __future__ import annotations

import dataclasses

import pytest
from hvplace.coordinator.failure import lost_at, replace_lost
from hvplace.coordinator.placement import reasons
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import (
    VM,
    HAPriority,
    Host,
    HostState,
    HostStatus,
    OnFailure,
    Resources,
    Rule,
    RuleKind,
)
from hvplace.proto.selectors import LabelExpression, NodeAffinity, NodeSelectorTerm, Op


def _host(name: str, mem: int = 8192) -> Host:
    return Host(name=name, capacity=Resources(vcpus=16, memory_mib=mem, disk_gib=100))


def _vm(name: str, ha: HAPriority = HAPriority.MEDIUM, mem: int = 1024) -> VM:
    return VM(scope="t", name=name, resources=Resources(1, mem, 1), ha_priority=ha)


def _anti(name: str, *members: str, on_failure: OnFailure = OnFailure.BLOCK) -> Rule:
    return Rule(
        scope="t", name=name, kind=RuleKind.ANTI_AFFINITY, members=members, on_failure=on_failure
    )


def _snap(
    hosts: list[Host], vms: list[VM], placements: dict[str, str], rules: list[Rule] = ()
) -> Snapshot:  # type: ignore[assignment]
    return Snapshot(
        revision=3,
        hosts={h.name: h for h in hosts},
        vms={v.key: v for v in vms},
        placements=placements,
        rules={r.key: r for r in rules},
    )


def test_lost_hosts_vms_replaced_by_ha_priority_when_room_is_short() -> None:
    # Room for two of the three 3 GiB VMs on h1: high and medium win, low waits; off never moves.
    vms = [
        _vm("low", HAPriority.LOW, 3072),
        _vm("high", HAPriority.HIGH, 3072),
        _vm("med", HAPriority.MEDIUM, 3072),
        _vm("off", HAPriority.OFF, 1024),
    ]
    snap = _snap([_host("h0", 16384), _host("h1", 7000)], vms, {v.key: "h0" for v in vms})
    plan = replace_lost(snap, ["h0"])
    assert plan.revision == 3
    assert plan.assignments == {"t/high": "h1", "t/med": "h1"}
    assert set(plan.pending) == {"t/low", "t/off"}
    assert plan.pending["t/off"].reasons[0].code == reasons.HA_OFF
    codes = {r.code for r in plan.pending["t/low"].reasons}
    assert codes == {reasons.HOST_LOST, reasons.INSUFFICIENT_MEMORY}
    assert "h0" not in plan.assignments.values()


def test_lost_hosts_placements_no_longer_count() -> None:
    # a and b are apart; h0 dies; a may go anywhere but b's host (h1) — h0's own a is gone.
    vms = [_vm("a"), _vm("b")]
    snap = _snap(
        [_host("h0"), _host("h1"), _host("h2")],
        vms,
        {"t/a": "h0", "t/b": "h1"},
        [_anti("ab", "a", "b")],
    )
    plan = replace_lost(snap, ["h0"])
    assert plan.assignments == {"t/a": "h2"}


def test_block_rule_keeps_vm_pending_rather_than_break_it() -> None:
    vms = [_vm("a"), _vm("b")]
    snap = _snap(
        [_host("h0"), _host("h1")], vms, {"t/a": "h0", "t/b": "h1"}, [_anti("ab", "a", "b")]
    )
    plan = replace_lost(snap, ["h0"])
    assert plan.assignments == {} and not plan.degraded
    assert plan.pending["t/a"].reasons[0].code == reasons.ANTI_AFFINITY


def test_degrade_rule_places_anyway_and_records_the_break() -> None:
    vms = [_vm("a"), _vm("b"), _vm("c"), _vm("d")]
    rules = [_anti("ab", "a", "b", on_failure=OnFailure.DEGRADE), _anti("cd", "c", "d")]
    placed = {"t/a": "h0", "t/b": "h1", "t/c": "h2", "t/d": "h0"}
    snap = _snap([_host("h0"), _host("h1"), _host("h2")], vms, placed, rules)
    plan = replace_lost(snap, ["h0"])
    # a breaks only its degrade rule (on h2 with c is fine... or h1 with b); d must avoid c.
    assert plan.assignments["t/d"] == "h1"
    assert plan.degraded == {"t/a": ("t/ab",)} or "t/a" not in plan.degraded
    # With the block rule cd, d may never join c on h2; with degrade ab, a joins b only
    # when nothing else fits: fill h2 so that a has to degrade.
    full = _snap([_host("h0"), _host("h1"), _host("h2", mem=1024)], vms, placed, rules)
    plan = replace_lost(full, ["h0"])
    assert plan.assignments == {"t/a": "h1", "t/d": "h1"}
    assert plan.degraded == {"t/a": ("t/ab",)}
    assert not plan.pending


def test_degrade_still_honours_capacity() -> None:
    vms = [_vm("a", mem=4096), _vm("b", mem=4096)]
    snap = _snap(
        [_host("h0"), _host("h1", mem=6000)],
        vms,
        {"t/a": "h0", "t/b": "h1"},
        [_anti("ab", "a", "b", on_failure=OnFailure.DEGRADE)],
    )
    plan = replace_lost(snap, ["h0"])
    assert plan.assignments == {} and plan.pending["t/a"].reasons[0].code == reasons.ANTI_AFFINITY


def test_degraded_affinity_member_does_not_pull_the_others_after_it() -> None:
    """A required affinity (on_failure=degrade) whose host failed: `a` can only go to
    rack r1, `b` and `c` only to rack r0. `b` breaks the rule to run at all and is
    recorded; `c` joining `b` breaks it just as much and must be recorded too (found by
    the failover property test), and `d`, free to go anywhere, joins `a`, which keeps it."""
    rack = {"h1": "r1", "h2": "r0"}
    hosts = [
        Host(name=n, labels={"rack": r}, capacity=Resources(16, 8192, 100)) for n, r in rack.items()
    ]
    hosts.append(_host("h0"))

    def on_rack(vm: VM, value: str) -> VM:
        term = NodeSelectorTerm((LabelExpression("rack", Op.IN, (value,)),))
        return dataclasses.replace(vm, node_affinity=NodeAffinity(required=(term,)))

    vms = [on_rack(_vm("a"), "r1"), on_rack(_vm("b"), "r0"), on_rack(_vm("c"), "r0"), _vm("d")]
    together = Rule(
        scope="t",
        name="together",
        kind=RuleKind.AFFINITY,
        members=("a", "b", "c", "d"),
        on_failure=OnFailure.DEGRADE,
    )
    snap = _snap(hosts, vms, {v.key: "h0" for v in vms}, [together])
    plan = replace_lost(snap, ["h0"])
    assert plan.assignments == {"t/a": "h1", "t/b": "h2", "t/c": "h2", "t/d": "h1"}
    assert plan.degraded == {"t/b": ("t/together",), "t/c": ("t/together",)}
    assert not plan.pending


LOST = HostStatus("gone", HostState.LOST, "lease expired", since=5.0)


@pytest.mark.parametrize(
    ("statuses", "seen_gone", "expected"),
    [
        # Seen deleted by this process's watch: lost from that moment.
        ({}, {"gone": 103.0}, {"gone": 103.0}),
        # Seen deleted before this leader took office (as a standby): still evidence.
        ({}, {"gone": 90.0}, {"gone": 90.0}),
        # Found absent (a late start, a relist): one lease TTL after taking office.
        ({}, {}, {"gone": 105.0}),
        # A status that is not `lost` (cordoned) changes nothing.
        ({"gone": HostStatus("gone", HostState.CORDONED)}, {}, {"gone": 105.0}),
        # Marked lost already (maybe by a previous leader): nothing more to declare.
        ({"gone": LOST}, {}, {}),
    ],
)
def test_lost_at_is_derived_from_records_and_the_term(
    statuses: dict[str, HostStatus], seen_gone: dict[str, float], expected: dict[str, float]
) -> None:
    got = lost_at(["gone"], statuses, seen_gone, office_since=100.0, lease_ttl_s=5.0)
    assert got == expected
