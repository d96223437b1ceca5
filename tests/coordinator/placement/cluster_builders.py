"""Small builders for engine tests: hosts, VMs, rules and snapshots in one line each."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hvplace.coordinator.placement import Batch, Plan, place
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import VM, Host, HostState, Resources, Rule, RuleKind, ScopePolicy


def host(
    name: str,
    cpu: int = 16,
    mem: int = 16384,
    disk: int = 500,
    state: HostState = HostState.READY,
    **labels: str,
) -> Host:
    return Host(
        name=name,
        labels=dict(labels),
        capacity=Resources(vcpus=cpu, memory_mib=mem, disk_gib=disk),
        state=state,
    )


def vm(
    name: str,
    scope: str = "t1",
    cpu: int = 1,
    mem: int = 1024,
    disk: int = 10,
    **labels: str,
) -> VM:
    return VM(
        scope=scope,
        name=name,
        labels=dict(labels),
        resources=Resources(vcpus=cpu, memory_mib=mem, disk_gib=disk),
    )


def anti(name: str, *members: str, scope: str = "t1", **kw: object) -> Rule:
    return Rule(scope=scope, name=name, kind=RuleKind.ANTI_AFFINITY, members=members, **kw)  # type: ignore[arg-type]


def affinity(name: str, *members: str, scope: str = "t1", **kw: object) -> Rule:
    return Rule(scope=scope, name=name, kind=RuleKind.AFFINITY, members=members, **kw)  # type: ignore[arg-type]


def snapshot(
    hosts: Iterable[Host],
    vms: Iterable[VM] = (),
    placements: Mapping[str, str] | None = None,
    rules: Iterable[Rule] = (),
    policies: Iterable[ScopePolicy] = (),
    reservations: Mapping[str, str] | None = None,
    revision: int = 7,
) -> Snapshot:
    return Snapshot(
        revision=revision,
        hosts={h.name: h for h in hosts},
        vms={v.key: v for v in vms},
        placements=dict(placements or {}),
        rules={r.key: r for r in rules},
        policies={p.scope: p for p in policies},
        reservations=dict(reservations or {}),
    )


def applied(snap: Snapshot, vms: Iterable[VM], plan: Plan) -> Snapshot:
    """The snapshot after committing `plan` for `vms`."""
    all_vms = dict(snap.vms)
    all_vms.update((v.key, v) for v in vms)
    placements = dict(snap.placements)
    placements.update(plan.assignments)
    return Snapshot(
        revision=snap.revision + 1,
        hosts=snap.hosts,
        vms=all_vms,
        placements=placements,
        rules=snap.rules,
        policies=snap.policies,
        reservations=snap.reservations,
    )


def place_all(snap: Snapshot, vms: Iterable[VM], atomic: bool = False) -> tuple[Plan, Snapshot]:
    batch = tuple(vms)
    plan = place(snap, Batch(batch, atomic=atomic))
    return plan, applied(snap, batch, plan)
