"""The filter chain (issue 11 item 3): one ordered list the search and explain both walk."""

from __future__ import annotations

from cluster_builders import anti, host, snapshot, vm
from hvplace.coordinator.placement import Batch, explain, filters, place, reasons
from hvplace.proto.records import HostState


def test_the_chain_names_every_host_reason_once_in_its_order() -> None:
    codes = [code for f in filters.CHAIN for code in f.codes]
    assert len(codes) == len(set(codes))
    assert [f.name for f in filters.CHAIN] == ["host_state", "node_affinity", "rules", "capacity"]
    not_about_hosts = {reasons.NO_HOSTS, reasons.ATOMIC_BATCH, reasons.HA_OFF}
    assert set(codes) == set(reasons.ALL_CODES) - not_about_hosts
    assert not hasattr(filters, "FILTER_ORDER")  # the chain is the only order


def test_a_host_counts_under_the_first_filter_of_the_chain_that_rejects_it() -> None:
    """h0 is cordoned, holds a member and is full; h1 holds a member and is full; h2 is
    full: each is reported by the earliest filter, as the chain is written."""
    cluster = [
        host("h0", mem=4096, state=HostState.CORDONED),
        host("h1", mem=4096),
        host("h2", mem=4096),
    ]
    running = [vm("a", mem=4096), vm("b", mem=4096), vm("c", mem=4096)]
    snap = snapshot(
        cluster,
        running,
        {"t1/a": "h0", "t1/b": "h1", "t1/c": "h2"},
        rules=[anti("db", "a", "b", "new")],
    )
    new = vm("new", mem=1024)
    why = explain(snap, new)
    assert [(r.code, r.hosts) for r in why.reasons] == [
        (reasons.ANTI_AFFINITY, 1),
        (reasons.INSUFFICIENT_MEMORY, 1),
        (reasons.HOST_CORDONED, 1),
    ]
    # The search agrees: no host passes the chain, and the plan's reasons are explain's.
    plan = place(snap, Batch((new,)))
    assert plan.pending["t1/new"].reasons == why.reasons
