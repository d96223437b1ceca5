"""Rule-aware failover admission (SPEC §5.1): after losing any k hosts, or one whole rack or
zone, can every VM that ran there be re-placed with every required rule and capacity?

One index serves every scenario: a scenario marks its hosts lost, takes their VMs out
(−1), re-places them (+1) and then undoes exactly that, so a check at 1,000 hosts costs
one index build plus a few searches per host that holds VMs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hvplace.coordinator.placement.engine import (
    Batch,
    Plan,
    explanation_at,
    ha_order,
    place,
    search,
)
from hvplace.coordinator.placement.groups import compile_groups
from hvplace.coordinator.placement.index import ClusterIndex
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import TOPOLOGY_HOST, VM, HAPriority, HostState, Rule

MAX_SCENARIOS = 2000
"""Bound on the failure combinations tried when `failures` > 1 (C(1000, 2) is ~500k):
combinations are taken in host-name order and `truncated` says when the bound cut in."""


@dataclass(frozen=True, slots=True)
class Stranding:
    """One failure scenario that strands VMs. `failed` is empty when the request's own
    VMs cannot be placed even with every host up."""

    failed: tuple[str, ...]
    stranded: tuple[str, ...]
    reasons: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdmissionResult:
    ok: bool
    impacts: tuple[Stranding, ...] = ()
    scenarios: int = 0
    """How many failure scenarios were simulated."""
    truncated: bool = False
    """True when MAX_SCENARIOS cut the combinations short (failures > 1)."""


def _scenarios(
    index: ClusterIndex, by_host: Mapping[int, list[str]], failures: int, topology_key: str
) -> tuple[list[tuple[int, ...]], bool]:
    if topology_key != TOPOLOGY_HOST:
        domains = index.domain_hosts(topology_key)
        found = []
        for domain in sorted(domains):
            hosts = tuple(p for p in domains[domain] if index.state[p] is not HostState.LOST)
            if any(p in by_host for p in hosts):
                found.append(hosts)
        return found, False
    # Hosts without VMs strand nothing when they fail alone; for k > 1 they are assumed to
    # survive (they are the spare capacity), which keeps the combinations few.
    loaded = sorted(p for p in by_host if index.state[p] is not HostState.LOST)
    size = min(max(1, failures), len(loaded))
    combos = itertools.islice(itertools.combinations(loaded, size), MAX_SCENARIOS + 1)
    found = list(combos)
    truncated = len(found) > MAX_SCENARIOS
    return found[:MAX_SCENARIOS], truncated


Size = tuple[int, int, int]
"""(vcpus, memory MiB, disk GiB) of the largest VM a capacity bound is counted in."""


class _Slots:
    """A sound lower bound on how many VMs of at most `size` the ready hosts can take:
    per host, min over resources of floor(free / size). Any VMs no larger than `size`,
    with no required rule and no node restriction, fit when they are no more than the
    slots (each host holds that many of the largest). Computed once per size and index."""

    def __init__(self, index: ClusterIndex) -> None:
        self.index = index
        self._total: dict[Size, int] = {}

    def of(self, pos: int, size: Size) -> int:
        index = self.index
        if not index.ready[pos]:
            return 0
        counts = [
            free // need
            for free, need in (
                (index.free_cpu[pos], size[0]),
                (index.free_mem[pos], size[1]),
                (index.free_disk[pos], size[2]),
            )
            if need > 0
        ]
        return max(0, min(counts)) if counts else 1 << 30

    def total(self, size: Size) -> int:
        found = self._total.get(size)
        if found is None:
            found = self._total[size] = sum(self.of(p, size) for p in range(len(self.index.names)))
        return found


def _fits_by_capacity(
    index: ClusterIndex, failed: tuple[int, ...], by_host: Mapping[int, list[str]], slots: _Slots
) -> bool:
    """The fast, sound shortcut: every restartable VM of the failed hosts is limited by
    capacity alone and they are no more than the surviving hosts' slots for the largest
    of them. False means "not shown this way" (the full simulation decides).
    One pass over the failed hosts' VMs; this runs for every scenario of every create."""
    vms, vm_groups = index.vms, index.vm_groups
    off = HAPriority.OFF
    count = cpu = mem = disk = 0
    for pos in failed:
        for key in by_host.get(pos, ()):
            vm = vms[key]
            if vm.ha_priority is off:
                continue
            groups = vm_groups.get(key)
            if groups and any(g.required for g in groups):
                return False
            if vm.node_affinity.required:
                return False
            r = vm.resources
            cpu = max(cpu, r.vcpus)
            mem = max(mem, r.memory_mib)
            disk = max(disk, r.disk_gib)
            count += 1
    if not count:
        return True
    size = (cpu, mem, disk)
    available = slots.total(size) - sum(slots.of(pos, size) for pos in failed)
    return available >= count


def _simulate(
    index: ClusterIndex,
    failed: tuple[int, ...],
    by_host: Mapping[int, list[str]],
    slots: _Slots | None = None,
) -> Stranding | None:
    if slots is not None and _fits_by_capacity(index, failed, by_host, slots):
        return None
    failed_set = set(failed)
    for pos in failed:
        index.set_lost(pos, True)
    taken_out: list[tuple[VM, int]] = []
    moving: list[VM] = []
    for pos in failed:
        for key in by_host.get(pos, ()):
            vm = index.vms[key]
            moving.append(vm)
            for spot in list(index.spots(key)):
                if spot in failed_set:
                    index.remove(vm, spot)
                    taken_out.append((vm, spot))
    proposals: list[tuple[VM, int]] = []
    stranded: list[str] = []
    why: dict[str, str] = {}
    for vm in ha_order(moving):
        if vm.ha_priority is HAPriority.OFF:
            continue  # never restarted after a failure, so it cannot be stranded
        target = search(index, vm)
        if target is None:
            stranded.append(vm.key)
            why[vm.key] = explanation_at(index, vm).summary()
            continue
        index.add(vm, target)
        proposals.append((vm, target))
    for vm, pos in reversed(proposals):
        index.remove(vm, pos)
    for vm, spot in taken_out:
        index.add(vm, spot)
    for pos in failed:
        index.set_lost(pos, False)
    if not stranded:
        return None
    return Stranding(
        failed=tuple(index.names[p] for p in failed), stranded=tuple(stranded), reasons=why
    )


def check_admission(
    snapshot: Snapshot,
    failures: int = 1,
    topology_key: str = TOPOLOGY_HOST,
    extra_vms: Sequence[VM] = (),
    extra_rules: Sequence[Rule] = (),
    exact: bool = False,
    extra_plan: Plan | None = None,
) -> AdmissionResult:
    """Simulate every single-host failure (any `failures` hosts, bounded; or each whole
    domain of `topology_key`) with what the request would add, and report what strands.

    A scenario whose VMs are limited by capacity alone and fit the survivors' slots is
    settled without a simulation (see _Slots: the same answer, in O(VMs moved));
    `exact` simulates every scenario in full (tests compare the two). `extra_plan` is
    the caller's placement of `extra_vms` on this snapshot, when it has one."""
    rules = dict(snapshot.rules)
    rules.update((r.key, r) for r in extra_rules)
    snap = dataclasses.replace(snapshot, rules=rules)
    impacts: list[Stranding] = []
    if extra_vms:
        if extra_plan is None or extra_plan.revision != snap.revision or extra_rules:
            extra_plan = place(snap, Batch(tuple(extra_vms)))
        plan = extra_plan
        if plan.pending:
            impacts.append(
                Stranding(
                    failed=(),
                    stranded=tuple(plan.pending),
                    reasons={k: e.summary() for k, e in plan.pending.items()},
                )
            )
        vms = dict(snap.vms)
        vms.update((vm.key, vm) for vm in extra_vms)
        placements = dict(snap.placements)
        placements.update(plan.assignments)
        snap = dataclasses.replace(snap, vms=vms, placements=placements)
    groups = compile_groups(snap.vms, snap.rules.values(), snap.policies.values())
    index = ClusterIndex(snap, snap.vms, groups)
    by_host: dict[int, list[str]] = {}
    for key, host in sorted(snap.placements.items()):
        pos = index.position.get(host)
        if pos is not None and key in snap.vms:
            by_host.setdefault(pos, []).append(key)
    scenarios, truncated = _scenarios(index, by_host, failures, topology_key)
    slots = None if exact else _Slots(index)
    for failed in scenarios:
        impact = _simulate(index, failed, by_host, slots)
        if impact is not None:
            impacts.append(impact)
    return AdmissionResult(
        ok=not impacts, impacts=tuple(impacts), scenarios=len(scenarios), truncated=truncated
    )
