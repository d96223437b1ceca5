"""Choosing where a placed VM moves: every required rule, reservations of migrations in
flight, the VM's own host left out, and an explicit target checked and refused with why."""

from __future__ import annotations

import dataclasses
import itertools

from cluster_builders import affinity, anti, host, snapshot, vm
from hvplace.coordinator.drain import plan_drain
from hvplace.coordinator.placement.moves import CURRENT_HOST, choose_target
from hvplace.proto.records import HostState


def test_the_engine_picks_a_host_the_rule_allows_and_never_the_own_one() -> None:
    snap = snapshot(
        [host("h0"), host("h1"), host("h2")],
        [vm("a"), vm("b")],
        {"t1/a": "h0", "t1/b": "h1"},
        rules=[anti("ab", "a", "b")],
    )
    got = choose_target(snap, "t1/a")
    assert (got.source, got.host) == ("h0", "h2")
    assert any(r.code == CURRENT_HOST for r in got.explanation.reasons)


def test_an_explicit_target_that_breaks_a_rule_is_refused_with_the_rule() -> None:
    snap = snapshot(
        [host("h0"), host("h1"), host("h2")],
        [vm("a"), vm("b")],
        {"t1/a": "h0", "t1/b": "h1"},
        rules=[anti("ab", "a", "b")],
    )
    got = choose_target(snap, "t1/a", to="h1")
    assert got.host is None
    assert got.refusal == "h1: anti-affinity rule `ab` (max 1 per host)"
    assert choose_target(snap, "t1/a", to="h2").host == "h2"
    assert "already runs on h0" in choose_target(snap, "t1/a", to="h0").refusal
    assert "not registered" in choose_target(snap, "t1/a", to="nope").refusal


def test_an_explicit_target_must_be_ready_and_fit() -> None:
    cordoned = dataclasses.replace(host("h1"), state=HostState.CORDONED)
    snap = snapshot(
        [host("h0"), cordoned, host("h2", mem=64)],
        [vm("a", mem=1024)],
        {"t1/a": "h0"},
    )
    assert choose_target(snap, "t1/a", to="h1").refusal == "h1: host cordoned"
    assert "insufficient memory" in choose_target(snap, "t1/a", to="h2").refusal


def test_an_affinity_member_cannot_leave_its_partners_host() -> None:
    snap = snapshot(
        [host("h0"), host("h1")],
        [vm("a"), vm("b")],
        {"t1/a": "h0", "t1/b": "h0"},
        rules=[affinity("ab", "a", "b")],
    )
    got = choose_target(snap, "t1/a")
    assert got.host is None
    assert "affinity rule `ab`" in got.explanation.summary()


def test_concurrent_migrations_under_anti_affinity_never_share_a_target() -> None:
    """Nova bug 1821755: two migrations at once must not pick the same free host. Each
    started migration reserves its target; the next choice counts the reservation."""
    snap = snapshot(
        [host(f"h{i}") for i in range(4)],
        [vm("a"), vm("b"), vm("c")],
        {"t1/a": "h0", "t1/b": "h1", "t1/c": "h2"},
        rules=[anti("abc", "a", "b", "c")],
    )
    first = choose_target(snap, "t1/a")
    assert first.host == "h3"
    after = dataclasses.replace(snap, reservations={"t1/a": "h3"})
    second = choose_target(after, "t1/b")
    assert second.host is None  # h0 still runs a (migrating), h3 holds a's reservation
    assert "anti-affinity rule `abc`" in second.explanation.summary()
    assert choose_target(after, "t1/b", to="h3").refusal.startswith("h3: anti-affinity")


def test_every_target_keeps_the_rule_for_every_order_of_requests() -> None:
    """Whatever order migrations of the members start in, with each reservation laid over
    the snapshot, no domain ever holds two members counting sources and targets."""
    names = ["a", "b", "c"]
    base = snapshot(
        [host(f"h{i}") for i in range(6)],
        [vm(n) for n in names],
        {"t1/a": "h0", "t1/b": "h1", "t1/c": "h2"},
        rules=[anti("abc", *names)],
    )
    for order in itertools.permutations(names):
        snap = base
        for n in order:
            got = choose_target(snap, f"t1/{n}")
            assert got.host is not None
            snap = dataclasses.replace(
                snap, reservations={**snap.reservations, f"t1/{n}": got.host}
            )
        spots = list(snap.placements.values()) + list(snap.reservations.values())
        assert len(spots) == len(set(spots)), order


def test_drain_dry_run_plans_every_vm_and_says_what_stays() -> None:
    snap = snapshot(
        [host("h0"), host("h1"), host("h2")],
        [vm("a"), vm("b"), vm("c")],
        {"t1/a": "h0", "t1/b": "h0", "t1/c": "h1"},
        rules=[anti("abc", "a", "b", "c")],
    )
    lines = plan_drain(snap, "h0")
    by_vm = {p.vm: p for p in lines}
    planned = [p for p in lines if p.state == "planned"]
    stays = [p for p in lines if p.state == "stays"]
    assert len(planned) == 1 and planned[0].to_host == "h2"
    assert len(stays) == 1 and "anti-affinity rule `abc`" in stays[0].reason
    assert set(by_vm) == {"t1/a", "t1/b"}
