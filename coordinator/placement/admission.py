"""Rule-aware failover admission (SPEC §5.1): after losing any k hosts, or one whole rack or
zone, can every VM that ran there be re-placed with every required rule and capacity?

One index serves every scenario: a scenario marks its hosts lost, takes their VMs out
(−1), re-places them (+1) and then undoes exactly that, so a check at 1,000 hosts costs
one index build plus a few searches per host that holds VMs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection, Mapping, Sequence
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
from hvplace.coordinator.placement.headroom import Headroom, headroom
from hvplace.coordinator.placement.index import ClusterIndex, host_table
from hvplace.coordinator.snapshot import Snapshot, restart_key
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
    index: ClusterIndex, loaded: Collection[int], failures: int, topology_key: str
) -> tuple[list[tuple[int, ...]], bool]:
    if topology_key != TOPOLOGY_HOST:
        domains = index.domain_hosts(topology_key)
        found = []
        for domain in sorted(domains):
            hosts = tuple(p for p in domains[domain] if index.state[p] is not HostState.LOST)
            if any(p in loaded for p in hosts):
                found.append(hosts)
        return found, False
    # Hosts without VMs strand nothing when they fail alone; for k > 1 they are assumed to
    # survive (they are the spare capacity), which keeps the combinations few.
    alive = sorted(p for p in loaded if index.state[p] is not HostState.LOST)
    size = min(max(1, failures), len(alive))
    combos = itertools.islice(itertools.combinations(alive, size), MAX_SCENARIOS + 1)
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

    def __init__(
        self, index: ClusterIndex, kept: Headroom | None = None, touched: Collection[int] = ()
    ) -> None:
        self.index = index
        self._total: dict[Size, int] = {}
        # With the kept headroom (whose free capacity the index's differs from at
        # `touched` only): a size it tracks costs O(touched), not a pass over the hosts.
        self._kept = kept
        self._touched = touched

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
        if found is None and self._kept is not None:
            index = self.index
            found = self._kept.total(
                size, index.ready, index.free_cpu, index.free_mem, index.free_disk, self._touched
            )
            if found is not None:
                self._total[size] = found
        if found is None:
            index = self.index
            cpu, mem, disk = size
            if cpu > 0 and mem > 0 and disk > 0:
                # The common shape, in one pass over the arrays (this runs per create).
                found = sum(
                    max(0, min(c // cpu, m // mem, d // disk))
                    for c, m, d, r in zip(
                        index.free_cpu, index.free_mem, index.free_disk, index.ready, strict=True
                    )
                    if r
                )
            else:
                found = sum(self.of(p, size) for p in range(len(index.names)))
            self._total[size] = found
        return found


RestartSizes = Mapping[tuple[int, int, int, int], int]


class _Loads:
    """Per host position: the VM keys assigned there and what its failure restarts
    (size and pinned -> count, HA priority off left out). From the snapshot's counters
    and what is laid over them (lazily, per host asked), or from one pass over the
    placements without them."""

    def __init__(self, index: ClusterIndex, snap: Snapshot) -> None:
        self.index = index
        position = index.position
        kept = snap.usage() if index.vms is snap.vms else None
        self.usage = None if kept is None else kept[0]
        self._restart: dict[int, RestartSizes] = {}
        self._keys: dict[int, list[str]] = {}
        self._base: Mapping[str, Collection[str]] = {}
        self._added: dict[int, set[str]] = {}
        self._removed: dict[int, set[str]] = {}
        self._loaded: set[int] | None = None
        if kept is None:
            for key, host in sorted(snap.placements.items()):
                pos = position.get(host)
                if pos is not None and key in snap.vms:
                    self._keys.setdefault(pos, []).append(key)
            for pos, keys in self._keys.items():
                sizes: dict[tuple[int, int, int, int], int] = {}
                for key in keys:
                    vm = snap.vms[key]
                    if vm.ha_priority is not HAPriority.OFF:
                        rk = restart_key(vm)
                        sizes[rk] = sizes.get(rk, 0) + 1
                self._restart[pos] = sizes
            self._loaded = set(self._keys)
            return
        usage, overlay = kept
        derived = snap.derived
        assert derived is not None
        self._base = usage.by_host
        for key in overlay:
            for where, specs, sign in (
                (derived.placements, derived.vms, -1),
                (snap.placements, snap.vms, 1),
            ):
                on = where.get(key)
                spec = specs.get(key)
                at = None if on is None or spec is None else position.get(on)
                if at is None or spec is None:
                    continue
                (self._added if sign > 0 else self._removed).setdefault(at, set()).add(key)
                if spec.ha_priority is HAPriority.OFF:
                    continue
                if at not in self._restart:  # the counters are the cache's: change a copy
                    self._restart[at] = dict(usage.restart.get(index.names[at], {}))
                moved = self._restart[at]
                assert isinstance(moved, dict)
                rk = restart_key(spec)
                n = moved.get(rk, 0) + sign
                if n:
                    moved[rk] = n
                else:
                    del moved[rk]
        self.touched = {*self._added, *self._removed}

    def restart(self, pos: int) -> RestartSizes | None:
        found = self._restart.get(pos)
        if found is None and self.usage is not None:
            return self.usage.restart.get(self.index.names[pos])
        return found

    def is_loaded(self, pos: int) -> bool:
        if self._loaded is not None:
            return pos in self._loaded
        if pos in self.touched:
            if self._added.get(pos):
                return True
            base = self._base.get(self.index.names[pos], ())
            removed = self._removed.get(pos, ())
            return any(k not in removed for k in base)
        return self.index.names[pos] in self._base

    @property
    def loaded(self) -> set[int]:
        """Every host position with a VM (O(hosts) once)."""
        if self._loaded is None:
            position = self.index.position
            found = {position[h] for h in self._base if h in position}
            for pos in self.touched:
                if self.keys(pos):
                    found.add(pos)
                else:
                    found.discard(pos)
            self._loaded = found
        return self._loaded

    def keys(self, pos: int) -> list[str]:
        """The VM keys assigned to the host at `pos`, sorted."""
        found = self._keys.get(pos)
        if found is None:
            base = self._base.get(self.index.names[pos], ())
            added, removed = self._added.get(pos), self._removed.get(pos)
            keys = set(base)
            if removed:
                keys -= removed
            if added:
                keys |= added
            found = self._keys[pos] = sorted(keys)
        return found


def _constrained(index: ClusterIndex, snap: Snapshot) -> set[int]:
    """Hosts holding a restartable member of a required group: a failure there needs the
    full search (rules), not the capacity bound."""
    found: set[int] = set()
    for group in index.groups:
        if not group.required:
            continue
        for member in group.members:
            host = snap.placements.get(member)
            vm = index.vms.get(member)
            if host is None or vm is None or vm.ha_priority is HAPriority.OFF:
                continue
            pos = index.position.get(host)
            if pos is not None:
                found.add(pos)
    return found


def _fits_by_capacity(
    failed: tuple[int, ...], loads: _Loads, constrained: Collection[int], slots: _Slots
) -> bool:
    """The fast, sound shortcut: every restartable VM of the failed hosts is limited by
    capacity alone and they are no more than the surviving hosts' slots for the largest
    of them. False means "not shown this way" (the full simulation decides).
    O(failed hosts) from the per-host restart counts; this runs per scenario per create."""
    count = cpu = mem = disk = 0
    for pos in failed:
        if pos in constrained:
            return False
        sizes = loads.restart(pos)
        if not sizes:
            continue
        for (c, m, d, pinned), n in sizes.items():
            if pinned:
                return False
            if c > cpu:
                cpu = c
            if m > mem:
                mem = m
            if d > disk:
                disk = d
            count += n
    if not count:
        return True
    size = (cpu, mem, disk)
    available = slots.total(size) - sum(slots.of(pos, size) for pos in failed)
    return available >= count


def _simulate(index: ClusterIndex, failed: tuple[int, ...], loads: _Loads) -> Stranding | None:
    """Mark the hosts lost, take their VMs out, re-place them by HA priority, then undo
    exactly that, round-robin cursors included: the index is as it was, and the answer
    depends on the scenario alone (not on which scenarios the bound settled before)."""
    failed_set = set(failed)
    cursors = index.cursors()
    for pos in failed:
        index.set_lost(pos, True)
    taken_out: list[tuple[VM, int]] = []
    moving: list[VM] = []
    for pos in failed:
        for key in loads.keys(pos):
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
    index.restore_cursors(cursors)
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
    settled by the capacity bound (see _Slots: the same answer) in O(failed hosts), from
    the restart counts the snapshot's counters keep per host; only the others are
    simulated. `exact` simulates every scenario in full (tests compare the two, and
    `check_admission_full` is the whole former computation, kept as their oracle).
    `extra_plan` is the caller's placement of `extra_vms` on this snapshot, when it has one."""
    snap, impacts = _with_request(snapshot, extra_vms, extra_rules, extra_plan)
    groups = compile_groups(
        snap.vms, snap.rules.values(), snap.policies.values(), scope_vms=snap.scope_vms
    )
    index = ClusterIndex(snap, snap.vms, groups)
    loads = _Loads(index, snap)
    constrained = _constrained(index, snap)
    slots = _Slots(index)
    if loads.usage is not None and not exact and failures <= 1 and topology_key == TOPOLOGY_HOST:
        # Any one host: the kept headroom names the few hosts the bound cannot settle.
        kept = headroom(index.table, loads.usage)
        count, scenarios = _single_host_scenarios(index, loads, constrained, kept)
        slots = _Slots(index, kept, loads.touched)
        truncated = False
    else:
        scenarios, truncated = _scenarios(index, loads.loaded, failures, topology_key)
        count = len(scenarios)
    for failed in scenarios:
        if not exact and _fits_by_capacity(failed, loads, constrained, slots):
            continue
        impact = _simulate(index, failed, loads)
        if impact is not None:
            impacts.append(impact)
    return AdmissionResult(
        ok=not impacts, impacts=tuple(impacts), scenarios=count, truncated=truncated
    )


def _single_host_scenarios(
    index: ClusterIndex, loads: _Loads, constrained: Collection[int], kept: Headroom
) -> tuple[int, list[tuple[int, ...]]]:
    """How many single-host scenarios there are (loaded hosts not lost), and the ones
    to look at: the hosts the request touches, the pinned and rule-bound ones, and those
    whose kept need exceeds the slots left (Headroom.over). Every other one passes the
    capacity bound, as `_fits_by_capacity` would find. O(touched + found), plus a
    count of the loaded hosts."""
    usage = loads.usage
    assert usage is not None
    table = index.table
    touched = loads.touched
    look = kept.over(index.ready, index.free_cpu, index.free_mem, index.free_disk, touched)
    look |= touched
    look.update(constrained)
    lost = HostState.LOST
    count = len(kept.loaded)
    for pos in touched:
        count += loads.is_loaded(pos) - (table.names[pos] in usage.by_host)
    count -= sum(1 for pos in table.lost if loads.is_loaded(pos))
    found: list[tuple[int, ...]] = [
        (p,) for p in sorted(look) if loads.is_loaded(p) and index.state[p] is not lost
    ]
    # With no loaded host, _scenarios yields the one empty combination: count it alike.
    return max(count, 1), found


def _with_request(
    snapshot: Snapshot,
    extra_vms: Sequence[VM],
    extra_rules: Sequence[Rule],
    extra_plan: Plan | None,
) -> tuple[Snapshot, list[Stranding]]:
    """The snapshot with the request's rules and placed VMs laid over it, and the impact
    of its VMs that fit nowhere even with every host up."""
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
        snap = snap.overlaid({vm.key: vm for vm in extra_vms}, plan.assignments)
    return snap, impacts


def check_admission_full(
    snapshot: Snapshot,
    failures: int = 1,
    topology_key: str = TOPOLOGY_HOST,
    extra_vms: Sequence[VM] = (),
    extra_rules: Sequence[Rule] = (),
) -> AdmissionResult:
    """The test oracle: every scenario simulated in full from plain copies of the records
    (no counters, no capacity bound), as admission was computed before it was kept
    incrementally. O(VMs) per scenario set; never on the request path."""
    snap, impacts = _with_request(snapshot, extra_vms, extra_rules, None)
    plain = Snapshot(
        revision=snap.revision,
        hosts=dict(snap.hosts),
        vms=dict(snap.vms),
        placements=dict(snap.placements),
        rules=dict(snap.rules),
        policies=dict(snap.policies),
        reservations=dict(snap.reservations),
        degraded=dict(snap.degraded),
    )
    groups = compile_groups(plain.vms, plain.rules.values(), plain.policies.values())
    index = ClusterIndex(plain, plain.vms, groups)
    loads = _Loads(index, plain)
    scenarios, truncated = _scenarios(index, loads.loaded, failures, topology_key)
    for failed in scenarios:
        impact = _simulate(index, failed, loads)
        if impact is not None:
            impacts.append(impact)
    return AdmissionResult(
        ok=not impacts, impacts=tuple(impacts), scenarios=len(scenarios), truncated=truncated
    )


def warm(snapshot: Snapshot) -> None:
    """Build what decisions read between changes of the hosts (the host table, free
    capacity and the failover headroom, O(hosts) once) ahead of the first decision, so
    that the first create after taking office does not pay for them."""
    kept = snapshot.usage()
    if kept is not None:
        headroom(host_table(snapshot), kept[0])
