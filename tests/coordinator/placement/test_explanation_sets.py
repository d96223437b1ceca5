"""explanation_at counts hosts with set operations; it must answer exactly as the plain
host-by-host walk of the filter chain (explanation_walk), whatever the cluster."""

from __future__ import annotations

import dataclasses

from cluster_builders import anti, host, snapshot, vm
from hvplace.coordinator.placement import Batch, place
from hvplace.coordinator.placement.engine import build_index
from hvplace.coordinator.placement.explanation import explanation_at, explanation_walk
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import VM, HostState
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import _counted, _with, clusters


@settings(max_examples=200, deadline=None)
@given(clusters(), st.data())
def test_sets_count_every_host_as_the_walk_does(
    cluster: tuple[Snapshot, list[VM], list[VM]], data: st.DataObject
) -> None:
    snap, first, second = cluster
    plan = place(snap, Batch(tuple(first)))
    snap = _with(snap, first, plan.assignments)
    if not second:
        return
    index = build_index(snap, second)
    keys = sorted({g.key for g in index.groups})
    for new in second:
        ignore = (
            frozenset(data.draw(st.lists(st.sampled_from(keys), unique=True)))
            if keys
            else frozenset()
        )
        assert explanation_at(index, new, ignore) == explanation_walk(index, new, ignore)
        # Proposals move the counts: the next VM is explained against them.
        pos = data.draw(st.integers(0, len(index.hosts) - 1))
        index.add(new, pos)


def test_a_group_that_rejects_every_domain_is_walked() -> None:
    """max_per_domain 0 rejects even the empty domains; the walk handles it."""
    cluster = [host("h0", zone="a"), host("h1"), host("h2", state=HostState.CORDONED)]
    rule = anti("db", "a", "new", topology_key="zone", max_per_domain=0)
    snap = snapshot(cluster, [vm("a")], {"t1/a": "h0"}, rules=[rule])
    new = vm("new")
    index = build_index(snap, [new])
    assert explanation_at(index, new) == explanation_walk(index, new)
    assert explanation_at(index, new).feasible_hosts == 0


@settings(max_examples=150, deadline=None)
@given(clusters(), st.integers(0, 2))
def test_a_batch_spec_replaces_the_unplaced_one_the_snapshot_holds(
    cluster: tuple[Snapshot, list[VM], list[VM]], in_flight: int
) -> None:
    """place() lays the batch's specs over the snapshot's without copying its maps: a VM
    the snapshot already holds (unplaced, other labels) is grouped by the batch's spec,
    exactly as when the snapshot never held it, with counters kept or not."""
    snap, first, second = cluster
    plan = place(snap, Batch(tuple(first)))
    snap = _with(snap, first, plan.assignments)
    relabelled = [
        dataclasses.replace(v, labels={"app": "web" if v.labels.get("app") == "db" else "db"})
        for v in second
    ]
    stale = dataclasses.replace(snap, vms={**snap.vms, **{v.key: v for v in relabelled}})
    expected = place(snap, Batch(tuple(second)))
    assert place(stale, Batch(tuple(second))) == expected
    assert place(_counted(stale, in_flight), Batch(tuple(second))) == expected
