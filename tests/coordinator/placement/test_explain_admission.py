"""explain text, reservations, failover admission and rule compliance."""

from __future__ import annotations

from cluster_builders import affinity, anti, host, place_all, snapshot, vm
from hvplace.coordinator.placement import (
    Batch,
    check_admission,
    explain,
    place,
    reasons,
    rule_compliance,
)
from hvplace.proto.records import ScopePolicy


def test_explain_groups_hosts_by_reason_like_the_spec_example() -> None:
    cluster = [host(f"h{i}", mem=8192) for i in range(5)]
    rule = anti("db", "db0", "db1", "db2", "db3")
    running = [vm(f"db{i}", mem=2048) for i in range(3)] + [
        vm("fat0", mem=6144),
        vm("fat1", mem=6144),
    ]
    placed = {"t1/db0": "h0", "t1/db1": "h1", "t1/db2": "h2", "t1/fat0": "h3", "t1/fat1": "h4"}
    snap = snapshot(cluster, running, placed, rules=[rule])
    why = explain(snap, vm("db3", mem=4096))
    assert why.summary() == (
        "0/5 hosts: 3 anti-affinity rule `db` (max 1 per host),"
        " 2 insufficient memory (need 4096 MiB, free 2048)"
    )
    assert [(r.code, r.hosts, r.rule) for r in why.reasons] == [
        (reasons.ANTI_AFFINITY, 3, "t1/db"),
        (reasons.INSUFFICIENT_MEMORY, 2, ""),
    ]


def test_explain_of_a_placed_vm_does_not_count_itself() -> None:
    snap = snapshot(
        hosts := [host("h0"), host("h1")],
        [vm("a"), vm("b")],
        {"t1/a": "h0", "t1/b": "h1"},
        rules=[anti("ab", "a", "b")],
    )
    assert len(hosts) == 2
    why = explain(snap, snap.vms["t1/a"])
    assert why.feasible_hosts == 1  # h0 (its own host) is fine, h1 holds b
    assert why.reasons[0].code == reasons.ANTI_AFFINITY


def test_reservations_consume_capacity_and_count_as_members() -> None:
    cluster = [host("h0", mem=4096), host("h1", mem=4096)]
    # `m` runs on h0 and is migrating to h1: it holds memory and counts on both.
    snap = snapshot(
        cluster,
        [vm("m", mem=3072)],
        {"t1/m": "h0"},
        rules=[anti("pair", "m", "n")],
        reservations={"t1/m": "h1"},
    )
    plan = place(snap, Batch((vm("n", mem=512),)))
    assert (
        plan.pending["t1/n"].summary() == "0/2 hosts: 2 anti-affinity rule `pair` (max 1 per host)"
    )
    plan = place(snap, Batch((vm("other", mem=2048),)))
    assert "insufficient memory (need 2048 MiB, free 1024)" in plan.pending["t1/other"].summary()


def test_batch_sees_its_own_proposals_for_capacity() -> None:
    plan, _ = place_all(snapshot([host("h0", mem=4096)]), [vm(f"v{i}", mem=1024) for i in range(5)])
    assert len(plan.assignments) == 4 and list(plan.pending) == ["t1/v4"]


def test_admission_refuses_when_a_host_failure_would_strand_an_anti_affinity_member() -> None:
    cluster = [host(f"h{i}") for i in range(3)]
    members = [vm(f"d{i}") for i in range(3)]
    placed = {f"t1/d{i}": f"h{i}" for i in range(3)}
    tight = snapshot(cluster, members, placed, rules=[anti("db", "d0", "d1", "d2")])
    result = check_admission(tight)
    assert not result.ok and result.scenarios == 3
    first = result.impacts[0]
    assert first.failed == ("h0",) and first.stranded == ("t1/d0",)
    assert "anti-affinity rule `db`" in first.reasons["t1/d0"]
    roomy = snapshot([*cluster, host("h3")], members, placed, rules=[anti("db", "d0", "d1", "d2")])
    assert check_admission(roomy).ok
    # The request's own rule is what breaks the headroom.
    loose = snapshot([*cluster], members, placed)
    assert check_admission(loose).ok
    assert not check_admission(loose, extra_rules=[anti("db", "d0", "d1", "d2")]).ok


def test_admission_with_extra_vms_and_capacity() -> None:
    cluster = [host("h0", mem=4096), host("h1", mem=4096)]
    snap = snapshot(cluster, [vm("a", mem=2048)], {"t1/a": "h0"})
    assert check_admission(snap).ok
    result = check_admission(snap, extra_vms=[vm("b", mem=3072)])
    assert not result.ok
    assert any("t1/b" in i.stranded or "t1/a" in i.stranded for i in result.impacts)


def test_admission_whole_zone_and_two_hosts() -> None:
    cluster = [
        host("a1", zone="a"),
        host("a2", zone="a"),
        host("b1", zone="b"),
        host("b2", zone="b"),
    ]
    pair = [vm("x"), vm("y")]
    snap = snapshot(cluster, pair, {"t1/x": "a1", "t1/y": "a2"}, rules=[anti("xy", "x", "y")])
    assert check_admission(snap).ok
    zone = check_admission(snap, topology_key="zone")
    assert zone.ok  # both move to zone b, one per host
    three = snapshot(
        cluster,
        [*pair, vm("z")],
        {"t1/x": "a1", "t1/y": "a2", "t1/z": "b1"},
        rules=[anti("xyz", "x", "y", "z")],
    )
    two_hosts = check_admission(three, failures=2)
    assert not two_hosts.ok and two_hosts.scenarios == 3


def test_admission_leaves_no_trace_between_scenarios() -> None:
    # Two single-host failures each fine; if the first simulation leaked its proposals,
    # the second would see a member where none runs and strand it.
    cluster = [host(f"h{i}") for i in range(4)]
    members = [vm(f"d{i}") for i in range(3)]
    placed = {f"t1/d{i}": f"h{i}" for i in range(3)}
    snap = snapshot(cluster, members, placed, rules=[anti("db", "d0", "d1", "d2")])
    result = check_admission(snap)
    assert result.ok and result.scenarios == 3


def test_rule_compliance_reports_violations_and_policy_groups() -> None:
    snap = snapshot(
        [host("h0"), host("h1")],
        [vm("a", app="w"), vm("b", app="w"), vm("c")],
        {"t1/a": "h0", "t1/b": "h0", "t1/c": "h1"},
        rules=[anti("ab", "a", "b"), affinity("ac", "a", "c"), anti("empty", "p", "q")],
        policies=[ScopePolicy("t1", label_anti_affinity=True)],
    )
    report = rule_compliance(snap)
    assert not report["t1/ab"].satisfied
    assert report["t1/ab"].violations == ("`t1/a`, `t1/b` share host h0 (max 1 per host)",)
    assert not report["t1/ac"].satisfied and "split over 2 hosts" in report["t1/ac"].violations[0]
    assert report["t1/empty"].satisfied
    assert not report["t1/label:app=w"].satisfied
