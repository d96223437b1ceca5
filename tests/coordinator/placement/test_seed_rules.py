"""One test (or more) per row of SPEC §2: every seed behaviour as a case of the rule model."""

from __future__ import annotations

from collections import Counter

import pytest
from cluster_builders import affinity, anti, host, place_all, snapshot, vm
from hvplace.coordinator.placement import (
    Batch,
    place,
    reasons,
    validate_policy_change,
    validate_rule_change,
)
from hvplace.proto.errors import Conflict, InvalidInput
from hvplace.proto.records import VM as VMRecord
from hvplace.proto.records import Enforcement, Resources, Rule, RuleKind, ScopePolicy
from hvplace.proto.selectors import (
    LabelExpression,
    LabelSelector,
    NodeAffinity,
    NodeSelectorTerm,
    Op,
    PreferredTerm,
)


def hosts(n: int, **labels: str) -> list:  # type: ignore[type-arg]
    return [host(f"h{i}", **labels) for i in range(n)]


# --------------------------------------------------------------------------- G8


def test_g8_same_label_in_one_cloudspace_never_shares_a_host() -> None:
    snap = snapshot(hosts(4), policies=[ScopePolicy("cs1", label_anti_affinity=True)])
    dbs = [vm(f"db{i}", scope="cs1", app="db") for i in range(4)]
    plan, _ = place_all(snap, dbs)
    assert not plan.pending
    assert len(set(plan.assignments.values())) == 4


def test_g8_other_cloudspace_may_share_hosts_and_unlabelled_vms_are_free() -> None:
    snap = snapshot(hosts(2), policies=[ScopePolicy("cs1", label_anti_affinity=True)])
    batch = [
        vm("a", scope="cs1", app="db"),
        vm("b", scope="cs1", app="db"),
        vm("c", scope="cs2", app="db"),
        vm("d", scope="cs2", app="db"),
        vm("e", scope="cs2", app="db"),  # cs2 has no policy: three on two hosts is fine
        vm("f", scope="cs1"),
    ]
    plan, _ = place_all(snap, batch)
    assert not plan.pending
    assert plan.assignments["cs1/a"] != plan.assignments["cs1/b"]


def test_g8_label_keys_restrict_which_labels_count() -> None:
    policy = ScopePolicy("cs1", label_anti_affinity=True, label_keys=("app",))
    snap = snapshot(hosts(1), policies=[policy])
    plan, _ = place_all(snap, [vm("a", scope="cs1", tier="x"), vm("b", scope="cs1", tier="x")])
    assert not plan.pending  # `tier` is not in label_keys
    plan, _ = place_all(snap, [vm("a", scope="cs1", app="x"), vm("b", scope="cs1", app="x")])
    assert list(plan.pending) == ["cs1/b"]


def test_g8_spread_two_puts_ten_vms_on_at_least_two_hosts() -> None:
    policy = ScopePolicy("cs1", label_anti_affinity=True, spread=2)
    # One host is far roomier, so capacity scoring alone would pile everything onto it.
    big = host("big", cpu=64, mem=65536)
    snap = snapshot([big, host("small", cpu=16, mem=16384)], policies=[policy])
    plan, _ = place_all(snap, [vm(f"w{i}", scope="cs1", app="web") for i in range(10)])
    assert not plan.pending
    assert len(set(plan.assignments.values())) >= 2


def test_g8_without_spread_the_vm_beyond_the_host_count_is_pending_with_reason() -> None:
    snap = snapshot(hosts(3), policies=[ScopePolicy("cs1", label_anti_affinity=True)])
    plan, _ = place_all(snap, [vm(f"w{i}", scope="cs1", app="web") for i in range(4)])
    assert sorted(plan.assignments) == ["cs1/w0", "cs1/w1", "cs1/w2"]
    why = plan.pending["cs1/w3"]
    assert why.feasible_hosts == 0
    assert [r.code for r in why.reasons] == [reasons.LABEL_ANTI_AFFINITY]
    assert "0/3 hosts: 3 label anti-affinity `app=web` in scope `cs1` (max 1 per host" in (
        why.summary()
    )


def test_g8_removing_the_spread_restores_strict_behaviour_for_new_placements() -> None:
    spread = ScopePolicy("cs1", label_anti_affinity=True, spread=2)
    snap = snapshot(hosts(3), policies=[spread])
    first = [vm(f"w{i}", scope="cs1", app="web") for i in range(2)]
    _, snap = place_all(snap, first)
    more = [vm(f"w{i}", scope="cs1", app="web") for i in range(2, 4)]
    with_spread = place(snap, Batch(tuple(more)))
    assert not with_spread.pending
    strict = ScopePolicy("cs1", label_anti_affinity=True)
    validate_policy_change(snap, strict)  # the two running VMs are on different hosts
    snap_strict = snapshot(
        snap.hosts.values(), snap.vms.values(), snap.placements, policies=[strict]
    )
    plan = place(snap_strict, Batch(tuple(more)))
    assert len(plan.assignments) == 1 and len(plan.pending) == 1


def test_g8_strict_policy_is_refused_when_running_vms_share_a_host() -> None:
    snap = snapshot(
        hosts(2),
        [vm("a", scope="cs1", app="db"), vm("b", scope="cs1", app="db")],
        {"cs1/a": "h0", "cs1/b": "h0"},
    )
    with pytest.raises(Conflict, match=r"`cs1/a`, `cs1/b` share host h0"):
        validate_policy_change(snap, ScopePolicy("cs1", label_anti_affinity=True))
    validate_policy_change(snap, ScopePolicy("cs1", label_anti_affinity=True, spread=1))


# --------------------------------------------------------------------------- Exoscale


def test_exoscale_named_anti_affinity_group_spreads_members() -> None:
    group = anti("web-aag", "w1", "w2", "w3")
    snap = snapshot(hosts(3), rules=[group])
    plan, _ = place_all(snap, [vm("w1"), vm("w2"), vm("w3"), vm("other")])
    assert not plan.pending
    assert len({plan.assignments[f"t1/w{i}"] for i in (1, 2, 3)}) == 3


def test_exoscale_group_needs_a_name() -> None:
    with pytest.raises(InvalidInput, match="rule name"):
        validate_rule_change(snapshot(hosts(1)), anti("", "a", "b"))


# --------------------------------------------------------------------------- OpenShift


def _na(*exprs: LabelExpression) -> NodeAffinity:
    return NodeAffinity(required=(NodeSelectorTerm(exprs),))


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (LabelExpression("zone", Op.IN, ("east",)), {"h-east"}),
        (LabelExpression("zone", Op.NOT_IN, ("east",)), {"h-west", "h-bare"}),
        (LabelExpression("gpu", Op.EXISTS), {"h-west"}),
        (LabelExpression("gpu", Op.DOES_NOT_EXIST), {"h-east", "h-bare"}),
        (LabelExpression("cores", Op.GT, ("32",)), {"h-west"}),
        (LabelExpression("cores", Op.LT, ("32",)), {"h-east"}),
        (LabelExpression("host", Op.IN, ("h-bare",)), {"h-bare"}),
    ],
)
def test_openshift_required_node_affinity_operators(
    expr: LabelExpression, expected: set[str]
) -> None:
    cluster = [
        host("h-east", zone="east", cores="16"),
        host("h-west", zone="west", gpu="a100", cores="64"),
        host("h-bare"),
    ]
    snap = snapshot(cluster)
    batch = [
        VMRecord(scope="t1", name=f"v{i}", resources=Resources(1, 512, 1), node_affinity=_na(expr))
        for i in range(6)
    ]
    plan, _ = place_all(snap, batch)
    assert not plan.pending
    assert set(plan.assignments.values()) == expected


def test_openshift_required_node_affinity_unmatched_is_pending_with_reason() -> None:
    snap = snapshot([host("h0", zone="east"), host("h1", zone="east")])
    lonely = VMRecord(
        scope="t1", name="v", node_affinity=_na(LabelExpression("zone", Op.IN, ("west",)))
    )
    plan, _ = place_all(snap, [lonely])
    assert plan.pending["t1/v"].summary() == (
        "0/2 hosts: 2 node affinity mismatch (requires (zone In (west)))"
    )


def test_openshift_preferred_node_affinity_weights_pick_the_host() -> None:
    # The preferred host is the fuller one: the preference must beat least-allocated.
    cluster = [host("h-fast", cpu=4, mem=4096, disktype="ssd"), host("h-slow", cpu=64, mem=65536)]
    prefers = NodeAffinity(
        preferred=(
            PreferredTerm(10, NodeSelectorTerm((LabelExpression("disktype", Op.IN, ("ssd",)),))),
        )
    )
    v = VMRecord(scope="t1", name="v", node_affinity=prefers)
    plan, _ = place_all(snapshot(cluster), [v])
    assert plan.assignments == {"t1/v": "h-fast"}
    # Without the preference, least-allocated picks the big host.
    plan, _ = place_all(snapshot(cluster), [vm("w")])
    assert plan.assignments == {"t1/w": "h-slow"}


def test_openshift_pod_anti_affinity_by_selector_and_zone_topology() -> None:
    cluster = [host(f"h{i}", zone=z) for i, z in enumerate(["a", "a", "b", "b"])]
    rule = Rule(
        scope="t1",
        name="fedora-apart",
        kind=RuleKind.ANTI_AFFINITY,
        selector=LabelSelector(match_labels={"app": "fedora"}),
        topology_key="zone",
    )
    snap = snapshot(cluster, rules=[rule])
    plan, _ = place_all(snap, [vm(f"f{i}", app="fedora") for i in range(3)] + [vm("x")])
    zones = [snap.hosts[plan.assignments[f"t1/f{i}"]].labels["zone"] for i in range(2)]
    assert sorted(zones) == ["a", "b"]
    assert "t1/f2" in plan.pending and "t1/x" in plan.assignments
    assert plan.pending["t1/f2"].reasons[0].code == reasons.ANTI_AFFINITY
    assert "max 1 per zone" in plan.pending["t1/f2"].summary()


def test_openshift_pod_affinity_follows_the_first_member_and_topology_label_missing() -> None:
    cluster = [
        host("r1a", rack="r1"),
        host("r1b", rack="r1"),
        host("r2a", rack="r2"),
        host("nolabel"),
    ]
    rule = Rule(
        scope="t1",
        name="together",
        kind=RuleKind.AFFINITY,
        selector=LabelSelector(match_labels={"app": "cache"}),
        topology_key="rack",
    )
    snap = snapshot(cluster, rules=[rule])
    plan, _ = place_all(snap, [vm(f"c{i}", app="cache") for i in range(5)])
    racks = {snap.hosts[h].labels.get("rack") for h in plan.assignments.values()}
    assert len(plan.assignments) == 5 and len(racks) == 1 and None not in racks
    # A host without the label can never take a member of a required rule with that key.
    only_bare = snapshot([host("nolabel")], rules=[rule])
    plan, _ = place_all(only_bare, [vm("c9", app="cache")])
    assert plan.pending["t1/c9"].reasons[0].code == reasons.TOPOLOGY_LABEL_MISSING


def test_preferred_anti_affinity_is_scored_not_enforced() -> None:
    rule = anti("soft", "a", "b", "c", enforcement=Enforcement.PREFERRED, weight=50)
    plan, _ = place_all(snapshot(hosts(2), rules=[rule]), [vm("a"), vm("b"), vm("c")])
    assert not plan.pending
    assert plan.assignments["t1/a"] != plan.assignments["t1/b"]  # the score kept them apart


def test_preferred_affinity_pulls_members_together() -> None:
    rule = affinity("soft", "a", "b", enforcement=Enforcement.PREFERRED, weight=50)
    plan, _ = place_all(snapshot(hosts(8), rules=[rule]), [vm("a"), vm("b")])
    assert plan.assignments["t1/a"] == plan.assignments["t1/b"]


# --------------------------------------------------------------------------- refused rules


def test_rule_already_violated_by_running_vms_is_refused() -> None:
    snap = snapshot(
        hosts(3), [vm("a"), vm("b"), vm("c")], {"t1/a": "h0", "t1/b": "h0", "t1/c": "h1"}
    )
    with pytest.raises(Conflict, match=r"`t1/a`, `t1/b` share host h0"):
        validate_rule_change(snap, anti("db", "a", "b", "c"))
    validate_rule_change(snap, anti("db", "a", "c"))  # a and c are apart: accepted
    # A preferred rule may start out broken: it is only scored.
    validate_rule_change(snap, anti("soft", "a", "b", enforcement=Enforcement.PREFERRED, weight=5))


def test_affinity_already_split_is_refused_and_reservations_count() -> None:
    snap = snapshot(hosts(3), [vm("a"), vm("b")], {"t1/a": "h0", "t1/b": "h1"})
    with pytest.raises(Conflict, match="split over 2 hosts"):
        validate_rule_change(snap, affinity("pair", "a", "b"))
    moving = snapshot(
        hosts(3), [vm("a"), vm("b")], {"t1/a": "h0", "t1/b": "h1"}, reservations={"t1/a": "h1"}
    )
    with pytest.raises(Conflict, match="share host h1"):
        validate_rule_change(moving, anti("apart", "a", "b"))


# --------------------------------------------------------------------------- vCD


def test_vcd_polarity_and_mandatory_map_to_kind_and_enforcement() -> None:
    mandatory = anti("apart", "a", "b")
    soft = affinity("near", "a", "b", enforcement=Enforcement.PREFERRED, weight=1)
    snap = snapshot(hosts(1), rules=[mandatory])
    plan, _ = place_all(snap, [vm("a"), vm("b")])
    assert len(plan.assignments) == 1 and len(plan.pending) == 1  # mandatory blocks
    plan, _ = place_all(snapshot(hosts(1), rules=[soft]), [vm("a"), vm("b")])
    assert len(plan.assignments) == 2


def test_vcd_vm_in_at_most_one_rule_per_polarity() -> None:
    snap = snapshot(hosts(3), [vm("a"), vm("b"), vm("c")], rules=[anti("one", "a", "b")])
    with pytest.raises(Conflict, match=r"`b` already in anti_affinity rule `one`"):
        validate_rule_change(snap, anti("two", "b", "c"))
    validate_rule_change(snap, affinity("pair", "b", "c"))  # the other polarity is fine
    # Updating `one` itself is not a conflict with its old version.
    validate_rule_change(snap, anti("one", "a", "b", "c"), old=snap.rules["t1/one"])
    # Scopes are independent.
    validate_rule_change(snap, anti("two", "b", "c", scope="t2"))


def test_vcd_selector_overlap_counts_too() -> None:
    sel = Rule(
        scope="t1",
        name="by-label",
        kind=RuleKind.ANTI_AFFINITY,
        selector=LabelSelector(match_labels={"app": "db"}),
    )
    snap = snapshot(hosts(2), [vm("a", app="db"), vm("b", app="db")], rules=[sel])
    with pytest.raises(Conflict, match="`a`"):
        validate_rule_change(snap, anti("named", "a", "z"))


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (anti("solo", "a"), "at least two VMs"),
        (anti("x" * 41, "a", "b"), "at most 40"),
        (anti("dup", "a", "a"), "twice"),
    ],
)
def test_vcd_rule_needs_two_members_and_a_short_name(rule: Rule, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        validate_rule_change(snapshot(hosts(1)), rule)


def test_contradictory_required_rules_are_refused() -> None:
    snap = snapshot(hosts(3), rules=[affinity("together", "a", "b")])
    with pytest.raises(Conflict, match=r"`together`.*`apart`"):
        validate_rule_change(snap, anti("apart", "a", "b"))
    # Together in a zone, apart on hosts: compatible.
    zoned = snapshot(
        [host("h0", zone="z"), host("h1", zone="z")],
        rules=[affinity("together", "a", "b", topology_key="zone")],
    )
    validate_rule_change(zoned, anti("apart", "a", "b"))
    # Together on a host, apart by zone: contradiction (a host is inside one zone).
    hosted = snapshot(
        [host("h0", zone="z"), host("h1", zone="y")], rules=[affinity("together", "a", "b")]
    )
    with pytest.raises(Conflict, match="contradict"):
        validate_rule_change(hosted, anti("apart", "a", "b", topology_key="zone"))


# --------------------------------------------------------------------------- Abiquo


def test_abiquo_layers_each_member_on_its_own_host_and_layers_independent() -> None:
    app = anti("app-layer", "tomcat1", "tomcat2")
    db = anti("db-layer", "db1", "db2")
    snap = snapshot(hosts(2), rules=[app, db])
    plan, _ = place_all(snap, [vm("tomcat1"), vm("tomcat2"), vm("db1"), vm("db2")])
    assert not plan.pending
    assert plan.assignments["t1/tomcat1"] != plan.assignments["t1/tomcat2"]
    assert plan.assignments["t1/db1"] != plan.assignments["t1/db2"]
    # Layers never intersect: a VM in two anti-affinity rules is refused.
    with pytest.raises(Conflict):
        validate_rule_change(snap, anti("db-layer", "db1", "db2", "tomcat1"), old=db)


def test_abiquo_deployed_vm_joins_a_layer_only_if_no_member_shares_its_host() -> None:
    layer = anti("layer", "a", "b")
    placed = {"t1/a": "h0", "t1/b": "h1", "t1/c": "h0", "t1/d": "h2"}
    snap = snapshot(hosts(3), [vm(n) for n in "abcd"], placed, rules=[layer])
    with pytest.raises(Conflict, match=r"`t1/a`, `t1/c` share host h0"):
        validate_rule_change(snap, anti("layer", "a", "b", "c"), old=layer)
    validate_rule_change(snap, anti("layer", "a", "b", "d"), old=layer)
    # A VM not deployed yet may always join.
    validate_rule_change(snap, anti("layer", "a", "b", "new"), old=layer)


def test_abiquo_not_enough_hosts_pending_and_atomic_batch_untouched() -> None:
    layer = anti("layer", "a", "b", "c")
    snap = snapshot(hosts(2), rules=[layer])
    batch = [vm("a"), vm("b"), vm("c")]
    plan, _ = place_all(snap, batch, atomic=True)
    assert plan.assignments == {}
    assert set(plan.pending) == {"t1/a", "t1/b", "t1/c"}
    assert plan.pending["t1/c"].reasons[0].code == reasons.ANTI_AFFINITY
    held = plan.pending["t1/a"].summary()
    assert "atomic batch cannot place `t1/c`" in held
    loose, _ = place_all(snap, batch)
    assert len(loose.assignments) == 2 and list(loose.pending) == ["t1/c"]


# --------------------------------------------------------------------------- spread


def test_max_per_domain_and_min_domains_over_racks() -> None:
    cluster = [host(f"h{i}", rack=f"r{i % 3}") for i in range(6)]
    rule = anti(
        "spread",
        "m0",
        "m1",
        "m2",
        "m3",
        "m4",
        "m5",
        "m6",
        topology_key="rack",
        max_per_domain=2,
        min_domains=3,
    )
    plan, _ = place_all(snapshot(cluster, rules=[rule]), [vm(f"m{i}") for i in range(7)])
    per_rack = Counter(cluster[int(h[1:])].labels["rack"] for h in plan.assignments.values())
    assert sorted(per_rack.values()) == [2, 2, 2]
    assert list(plan.pending) == ["t1/m6"]
    # Balanced: the first three members each opened a different rack.
    first_three = {cluster[int(plan.assignments[f"t1/m{i}"][1:])].labels["rack"] for i in range(3)}
    assert len(first_three) == 3


def test_cordoned_draining_lost_hosts_take_nothing() -> None:
    from hvplace.proto.records import HostState

    cluster = [
        host("a", state=HostState.CORDONED),
        host("b", state=HostState.DRAINING),
        host("c", state=HostState.LOST),
    ]
    plan, _ = place_all(snapshot(cluster), [vm("v")])
    codes = sorted(r.code for r in plan.pending["t1/v"].reasons)
    assert codes == [reasons.HOST_CORDONED, reasons.HOST_DRAINING, reasons.HOST_LOST]
