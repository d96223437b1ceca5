"""Phases derived from the records (table) and the re-placement of a VM off the hosts it
failed on (pure)."""

from __future__ import annotations

import dataclasses

import pytest
from coord_support import host, vm
from hvplace.coordinator.phases import derive
from hvplace.coordinator.restarts import excluding, replace_failed
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import (
    Assignment,
    DomainState,
    DomainStatus,
    HostInfo,
    Phase,
    Power,
    StartFailure,
    VMStatus,
)
from hvplace.proto.selectors import LabelExpression, NodeAffinity, NodeSelectorTerm, Op

A = vm("a")
AT = Assignment(vm=A, host="h1", epoch=2)
SCHEDULED = VMStatus(scope="acme", name="a", phase=Phase.SCHEDULED, host="h1", epoch=2)


def dom(state: DomainState, epoch: int = 2, host_name: str = "h1", error: str = "") -> DomainStatus:
    return DomainStatus(
        scope="acme", name="a", host=host_name, epoch=epoch, state=state, last_error=error
    )


@pytest.mark.parametrize(
    ("status", "assignment", "domain", "power", "phase", "reason_has"),
    [
        (None, None, None, Power.RUNNING, Phase.PENDING, ""),
        (SCHEDULED, AT, None, Power.RUNNING, Phase.SCHEDULED, ""),
        (SCHEDULED, AT, dom(DomainState.RUNNING), Power.RUNNING, Phase.RUNNING, ""),
        (SCHEDULED, AT, dom(DomainState.PAUSED), Power.RUNNING, Phase.RUNNING, ""),
        # A report from an older epoch or another host says nothing about now.
        (SCHEDULED, AT, dom(DomainState.RUNNING, epoch=1), Power.RUNNING, Phase.SCHEDULED, ""),
        (SCHEDULED, AT, dom(DomainState.RUNNING, host_name="h9"), Power.RUNNING, Phase.SCHEDULED, ""),
        (SCHEDULED, AT, dom(DomainState.DEFINED), Power.STOPPED, Phase.STOPPED, ""),
        (SCHEDULED, AT, dom(DomainState.STOPPED), Power.STOPPED, Phase.STOPPED, ""),
        (SCHEDULED, AT, dom(DomainState.DEFINED), Power.RUNNING, Phase.SCHEDULED, "starting"),
        (SCHEDULED, AT, dom(DomainState.FAILED, error="PCDATA"), Power.RUNNING, Phase.FAILED, "on h1: PCDATA"),
        (SCHEDULED, AT, dom(DomainState.CRASHED), Power.RUNNING, Phase.SCHEDULED, "crashed"),
        (SCHEDULED, AT, dom(DomainState.FENCED), Power.RUNNING, Phase.SCHEDULED, "fenced"),
        (
            VMStatus(scope="acme", name="a", phase=Phase.FAILED, reason="failed on 3 hosts"),
            None,
            None,
            Power.RUNNING,
            Phase.FAILED,
            "failed on 3 hosts",
        ),
        (
            VMStatus(scope="acme", name="a", phase=Phase.PENDING, reason="0/2 hosts"),
            AT,
            dom(DomainState.RUNNING),
            Power.RUNNING,
            Phase.PENDING,
            "0/2 hosts",
        ),
        (
            VMStatus(
                scope="acme",
                name="a",
                phase=Phase.SCHEDULED,
                start_failures=(StartFailure(host="h0", epoch=1, reason="refused"),),
            ),
            AT,
            None,
            Power.RUNNING,
            Phase.SCHEDULED,
            "failed to start on h0: refused",
        ),
    ],
)  # fmt: skip
def test_phase_from_the_records(
    status: VMStatus | None,
    assignment: Assignment | None,
    domain: DomainStatus | None,
    power: Power,
    phase: Phase,
    reason_has: str,
) -> None:
    got = derive(dataclasses.replace(A, power=power), status, assignment, domain)
    assert got.phase is phase
    assert reason_has in got.reason


def test_a_degraded_host_is_named_in_the_reason() -> None:
    degraded = HostInfo(name="h1", hypervisor_error="libvirtd gone")
    got = derive(A, SCHEDULED, AT, dom(DomainState.RUNNING), degraded)
    assert got.phase is Phase.RUNNING and got.reason == "host h1 degraded: libvirtd gone"


def test_excluding_adds_not_in_to_every_required_term() -> None:
    zone = LabelExpression(key="zone", operator=Op.IN, values=("east",))
    aff = NodeAffinity(required=(NodeSelectorTerm((zone,)), NodeSelectorTerm(())))
    out = excluding(aff, ["h2", "h1"])
    not_in = LabelExpression(key="host", operator=Op.NOT_IN, values=("h1", "h2"))
    assert [t.match_expressions for t in out.required] == [(zone, not_in), (not_in,)]
    only = LabelExpression(key="host", operator=Op.NOT_IN, values=("h1",))
    assert excluding(NodeAffinity(), ["h1"]).required == (NodeSelectorTerm((only,)),)
    assert excluding(aff, []) is aff


def test_replace_failed_avoids_every_failed_host_or_stays_pending() -> None:
    infos = [host("h1"), host("h2"), host("h3")]
    snap = Snapshot.from_records(1, infos, {}, [A], [AT], [], [])
    plan = replace_failed(snap, A, ["h1", "h2"])
    assert plan.assignments == {"acme/a": "h3"}
    plan = replace_failed(snap, A, ["h1", "h2", "h3"])
    assert not plan.assignments and "node affinity" in plan.pending["acme/a"].summary()
