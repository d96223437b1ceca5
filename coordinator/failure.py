"""Host failure, pure: when an unregistered host counts as lost (derived from the records,
level-triggered), and the failover plan: lost hosts → their VMs re-placed by HA priority
with every rule (on_failure=degrade rules broken knowingly when nothing else fits)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from hvplace.coordinator.placement import Plan, filters, reasons
from hvplace.coordinator.placement.engine import build_index, explanation_at, ha_order, search
from hvplace.coordinator.placement.index import ClusterIndex
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import (
    VM,
    Explanation,
    HAPriority,
    HostState,
    HostStatus,
    OnFailure,
    ReasonCount,
)


def lost_at(
    unregistered: Iterable[str],
    statuses: Mapping[str, HostStatus],
    seen_gone: Mapping[str, float],
    *,
    office_since: float,
    lease_ttl_s: float,
) -> dict[str, float]:
    """When each unregistered host not yet marked lost is to be declared lost.

    A host whose registration this process saw deleted is lost from that moment: the
    key rides the agent's lease, so the lease had expired (and the agent fenced). Of a
    host found absent without a delete (this leader started after it vanished, or
    relisted) nothing says when it went, so it is lost one lease TTL after this leader
    took office: by then any lease that registration could still ride has expired.
    The answer depends only on records and this term's start, never on a missed event.
    """
    due: dict[str, float] = {}
    for name in unregistered:
        status = statuses.get(name)
        if status is not None and status.state is HostState.LOST:
            continue
        due[name] = seen_gone.get(name, office_since + lease_ttl_s)
    return due


def replace_lost(snapshot: Snapshot, lost_hosts: Collection[str]) -> Plan:
    """A plan for the VMs assigned to `lost_hosts`; those hosts take nothing and what
    ran there no longer counts. `off` VMs stay pending; a VM that would break an
    on_failure=degrade rule is placed anyway and listed in `degraded`."""
    lost = set(lost_hosts)
    moving = [
        snapshot.vms[key]
        for key, host in sorted(snapshot.placements.items())
        # A VM live-migrating off a lost host is settled by its migration (completed
        # where it runs now, or aborted and then re-placed here): coordinator/migration.py.
        if host in lost and key in snapshot.vms and key not in snapshot.reservations
    ]
    index = build_index(snapshot, moving, lost_hosts=lost)
    return replace_vms(index, snapshot.revision, moving, degrade=True)


def degradable(index: ClusterIndex, vm: VM) -> frozenset[str]:
    return frozenset(
        g.key
        for g in index.vm_groups.get(vm.key, ())
        if g.required and g.on_failure is OnFailure.DEGRADE
    )


def ha_off_explanation(vm: VM) -> Explanation:
    return Explanation(
        vm=vm.key,
        total_hosts=0,
        feasible_hosts=0,
        reasons=(
            ReasonCount(
                code=reasons.HA_OFF,
                message="HA priority off: not restarted after its host failed",
                hosts=0,
            ),
        ),
    )


def replace_vms(index: ClusterIndex, revision: int, vms: Iterable[VM], degrade: bool) -> Plan:
    """Re-place VMs whose host failed, by HA priority. With `degrade`, a VM that fits
    nowhere under its on_failure=degrade rules is placed ignoring them (capacity and
    every block rule still hold) and listed in `degraded`."""
    assignments: dict[str, str] = {}
    pending: dict[str, Explanation] = {}
    degraded: dict[str, tuple[str, ...]] = {}
    for vm in ha_order(vms):
        if vm.ha_priority is HAPriority.OFF:
            pending[vm.key] = ha_off_explanation(vm)
            continue
        pos = search(index, vm)
        broken: tuple[str, ...] = ()
        if pos is None and degrade:
            ignore = degradable(index, vm)
            if ignore:
                pos = search(index, vm, ignore)
                if pos is not None:
                    broken = tuple(
                        g.key
                        for g in index.vm_groups.get(vm.key, ())
                        if g.key in ignore and filters.group_rejection(g, pos) is not None
                    )
        if pos is None:
            pending[vm.key] = explanation_at(index, vm)
            continue
        # An affinity this VM breaks keeps its domain where the members that keep the
        # rule run: counted there, the VM would let later members join it unrecorded.
        # (An anti-affinity counts it: more members beside it would break it further.)
        groups = index.vm_groups.get(vm.key, ()) if broken else ()
        index.add(vm, pos, [g.key for g in groups if g.key in broken and not g.anti])
        assignments[vm.key] = index.names[pos]
        if broken:
            degraded[vm.key] = broken
    return Plan(revision=revision, assignments=assignments, pending=pending, degraded=degraded)
