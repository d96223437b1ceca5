"""A required affinity's members placed in one batch are placed together when they can be:
the first member goes where the others' node affinity lets them follow, and a member a
rule held back gets another try once the rest of the batch is placed."""

from __future__ import annotations

import dataclasses

from cluster_builders import affinity, host, place_all, snapshot, vm
from hvplace.proto.records import ScopePolicy
from hvplace.proto.selectors import LabelExpression, NodeAffinity, NodeSelectorTerm, Op
from test_properties import broken_required_rules


def pinned(name: str, *zones: str, **labels: str) -> object:
    term = NodeSelectorTerm((LabelExpression("zone", Op.IN, zones),))
    return dataclasses.replace(vm(name, **labels), node_affinity=NodeAffinity(required=(term,)))


def test_the_first_member_goes_where_a_pinned_member_can_follow() -> None:
    """`free` has no node affinity and comes first; `zoned` may only run in zone a.
    Placed anywhere, `free` would leave `zoned` nowhere to go and both pending."""
    cluster = [host("h0", zone="a")] + [host(f"h{i}", zone="b") for i in range(1, 8)]
    for revision in range(8):  # whichever host the round-robin starts at
        snap = dataclasses.replace(
            snapshot(cluster, rules=[affinity("pair", "free", "zoned")]), revision=revision
        )
        plan, after = place_all(snap, [vm("free"), pinned("zoned", "a")])
        assert plan.pending == {}
        assert plan.assignments == {"t1/free": "h0", "t1/zoned": "h0"}
        assert broken_required_rules(after) == []


def test_members_pinned_apart_stay_pending_with_the_reason() -> None:
    cluster = [host("h0", zone="a"), host("h1", zone="b")]
    snap = snapshot(cluster, rules=[affinity("pair", "x", "y")])
    plan, _after = place_all(snap, [pinned("x", "a"), pinned("y", "b")])
    assert plan.assignments == {}
    assert [r.code for r in plan.pending["t1/y"].reasons] == ["affinity", "node_affinity"]
    assert [r.code for r in plan.pending["t1/x"].reasons] == ["atomic_batch"]


def test_a_member_held_by_a_spread_is_tried_again_once_the_spread_is_met() -> None:
    """Four VMs share role=db in a scope spreading that label over 3 hosts; the pair
    `a`, `b` must share a host. `b` cannot join `a` until 3 hosts hold a db VM, which
    the later `c` and `d` bring about: `b` then fits beside `a`."""
    cluster = [host(f"h{i}") for i in range(4)]
    policy = ScopePolicy("t1", label_anti_affinity=True, spread=3, label_keys=("role",))
    snap = snapshot(cluster, rules=[affinity("pair", "a", "b")], policies=[policy])
    batch = [vm(n, role="db") for n in ("a", "b", "c", "d")]
    plan, after = place_all(snap, batch)
    assert plan.pending == {}
    assert plan.assignments["t1/a"] == plan.assignments["t1/b"]
    assert len({plan.assignments[f"t1/{n}"] for n in "acd"}) == 3
    assert broken_required_rules(after) == []
