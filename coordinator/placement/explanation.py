"""Why a VM fits nowhere: every host counted under the first filter of the chain that
rejects it (filters.CHAIN), worked out filter by filter over sets of hosts.

The whole-host filters are set operations: hosts not ready (found with list searches in
C), the node affinity's admitted set (kept by the host table), a required group's
domains (its counts name the few domains that reject; an affinity keeps the few that
accept). Only capacity looks at hosts one by one, and only at those left, which the
search has just scanned as well. `explanation_walk` is the plain host-by-host walk of
the chain, the oracle the tests hold the sets to.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from hvplace.coordinator.placement import filters, reasons
from hvplace.coordinator.placement.index import BatchGroup, ClusterIndex
from hvplace.proto.records import VM, Explanation, ReasonCount

_ORDER = {code: i for i, code in enumerate(reasons.ALL_CODES)}
_NO_FREE = -(1 << 62)
_CHAIN_KNOWN = ("host_state", "node_affinity", "rules", "capacity")

Tally = dict[tuple[str, str], list[int]]
"""(code, group key or "") -> [hosts, most free of the short resource]."""


def _required(index: ClusterIndex, vm: VM, ignore: frozenset[str]) -> list[BatchGroup]:
    return [g for g in index.vm_groups.get(vm.key, ()) if g.required and g.key not in ignore]


def _unready(ready: list[bool]) -> list[int]:
    """Positions of the hosts not ready, found by C-level list searches."""
    found: list[int] = []
    at = -1
    for _ in range(ready.count(False)):
        at = ready.index(False, at + 1)
        found.append(at)
    return found


def _finish(
    index: ClusterIndex,
    vm: VM,
    tally: Tally,
    group_of: dict[str, BatchGroup],
    feasible: int,
) -> Explanation:
    rows = sorted(tally.items(), key=lambda kv: (-kv[1][0], _ORDER[kv[0][0]], kv[0][1]))
    counted = [
        ReasonCount(
            code=code,
            message=filters.message(code, group_of.get(group_key), vm, most_free),
            hosts=hosts,
            rule=group_key,
        )
        for (code, group_key), (hosts, most_free) in rows
        if hosts
    ]
    if not index.hosts:
        counted = [ReasonCount(code=reasons.NO_HOSTS, message="no hosts registered", hosts=0)]
    return Explanation(
        vm=vm.key, total_hosts=len(index.hosts), feasible_hosts=feasible, reasons=tuple(counted)
    )


def explanation_walk(
    index: ClusterIndex, vm: VM, ignore: frozenset[str] = frozenset()
) -> Explanation:
    """Every host against the filter chain, one by one (the oracle)."""
    ask = filters.ask(index, vm, _required(index, vm, ignore))
    first_rejection = filters.first_rejection
    tally: Tally = {}
    group_of: dict[str, BatchGroup] = {}
    feasible = 0
    free_of = {
        reasons.INSUFFICIENT_MEMORY: index.free_mem,
        reasons.INSUFFICIENT_CPU: index.free_cpu,
        reasons.INSUFFICIENT_DISK: index.free_disk,
    }
    for pos in range(len(index.hosts)):
        rejected = first_rejection(index, pos, ask)
        if rejected is None:
            feasible += 1
            continue
        code, group = rejected
        group_key = ""
        if group is not None:
            group_key = group.key
            group_of[group_key] = group
        entry = tally.setdefault((code, group_key), [0, _NO_FREE])
        entry[0] += 1
        free = free_of.get(code)
        if free is not None:
            entry[1] = max(entry[1], free[pos])
    return _finish(index, vm, tally, group_of, feasible)


class _Left:
    """The hosts no filter has rejected yet: all but `excluded` while `hosts` is None
    (no filter has narrowed them yet), else exactly `hosts`."""

    __slots__ = ("excluded", "hosts", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self.excluded: set[int] = set()
        self.hosts: set[int] | None = None

    def reject(self, rejected: Iterable[int]) -> int:
        """Take out the hosts of `rejected` still left; how many were."""
        if self.hosts is None:
            hit = set(rejected) - self.excluded
            self.excluded |= hit
            return len(hit)
        before = len(self.hosts)
        self.hosts.difference_update(rejected)
        return before - len(self.hosts)

    def keep(self, kept: Iterable[int]) -> int:
        """Take out every host left that is not in `kept`; how many were."""
        if self.hosts is None:
            left = set(kept) - self.excluded
            hit = self.total - len(self.excluded) - len(left)
        else:
            left = self.hosts.intersection(kept)
            hit = len(self.hosts) - len(left)
        self.hosts = left
        return hit

    def positions(self) -> Iterable[int]:
        if self.hosts is not None:
            return self.hosts
        excluded = self.excluded
        if not excluded:
            return range(self.total)
        return (pos for pos in range(self.total) if pos not in excluded)


def _group_sets(
    index: ClusterIndex, group: BatchGroup
) -> tuple[list[tuple[str, Collection[int]]], frozenset[int] | None] | None:
    """A required group's rejections as host sets: (code, hosts) to take out, then the
    hosts to keep (an occupied affinity's domains; None keeps all). None when the group
    is one the sets cannot express (max_per_domain below 1: every domain rejects)."""
    if group.anti and group.max_per_domain < 1:
        return None
    by_domain = index.domain_hosts(group.topology_key)
    out: list[tuple[str, Collection[int]]] = []
    missing = index.table.unlabelled(group.topology_key)
    if missing:
        out.append((reasons.TOPOLOGY_LABEL_MISSING, missing))
    if group.anti:
        bound = group.max_per_domain
        spreading = group.occupied < group.spread_target
        over = str(group.rejection_code())
        for domain, count in group.counts.items():
            if count >= bound:
                out.append((over, by_domain.get(domain, ())))
            elif count and spreading:
                out.append((reasons.SPREAD, by_domain.get(domain, ())))
        return out, None
    if not group.occupied:
        return out, None
    kept: set[int] = set()
    for domain in group.counts:
        kept.update(by_domain.get(domain, ()))
    return out, frozenset(kept)


def explanation_at(
    index: ClusterIndex, vm: VM, ignore: frozenset[str] = frozenset()
) -> Explanation:
    """Every host against the filter chain (filters.CHAIN); a host counts under its
    first rejection, and hosts rejected alike are grouped. Same answer as
    `explanation_walk`, in set operations but for capacity."""
    if tuple(f.name for f in filters.CHAIN) != _CHAIN_KNOWN:
        return explanation_walk(index, vm, ignore)  # pragma: no cover - a new filter
    required = _required(index, vm, ignore)
    tally: Tally = {}
    group_of: dict[str, BatchGroup] = {}
    left = _Left(len(index.hosts))

    # 1. Host state.
    unready = _unready(index.ready)
    if unready:
        state = index.state
        for pos in unready:
            code = filters.STATE_CODES[state[pos]]
            entry = tally.setdefault((code, ""), [0, _NO_FREE])
            entry[0] += 1
        left.reject(unready)

    # 2. Node affinity.
    admitted = index.admitted(vm.node_affinity)
    if admitted is not None:
        hit = left.keep(admitted)
        if hit:
            tally[(reasons.NODE_AFFINITY, "")] = [hit, _NO_FREE]

    # 3. Required rules, in the order the search checks them.
    for group in required:
        sets = _group_sets(index, group)
        if sets is None:
            _walk_group(index, group, left, tally, group_of)
            continue
        rejections, kept = sets
        for code, hosts in rejections:
            hit = left.reject(hosts)
            if hit:
                _count(tally, group_of, code, group, hit)
        if kept is not None:
            hit = left.keep(kept)
            if hit:
                _count(tally, group_of, reasons.AFFINITY, group, hit)

    # 4. Capacity, host by host over what is left.
    need = vm.resources
    mem, cpu, disk = need.memory_mib, need.vcpus, need.disk_gib
    free_mem, free_cpu, free_disk = index.free_mem, index.free_cpu, index.free_disk
    feasible = 0
    short_mem = short_cpu = short_disk = 0
    most_mem = most_cpu = most_disk = _NO_FREE
    for pos in left.positions():
        free = free_mem[pos]
        if free < mem:
            short_mem += 1
            if free > most_mem:
                most_mem = free
            continue
        free = free_cpu[pos]
        if free < cpu:
            short_cpu += 1
            if free > most_cpu:
                most_cpu = free
            continue
        free = free_disk[pos]
        if free < disk:
            short_disk += 1
            if free > most_disk:
                most_disk = free
            continue
        feasible += 1
    if short_mem:
        tally[(reasons.INSUFFICIENT_MEMORY, "")] = [short_mem, most_mem]
    if short_cpu:
        tally[(reasons.INSUFFICIENT_CPU, "")] = [short_cpu, most_cpu]
    if short_disk:
        tally[(reasons.INSUFFICIENT_DISK, "")] = [short_disk, most_disk]
    return _finish(index, vm, tally, group_of, feasible)


def _count(
    tally: Tally, group_of: dict[str, BatchGroup], code: str, group: BatchGroup, hit: int
) -> None:
    group_of[group.key] = group
    entry = tally.setdefault((code, group.key), [0, _NO_FREE])
    entry[0] += hit


def _walk_group(
    index: ClusterIndex,
    group: BatchGroup,
    left: _Left,
    tally: Tally,
    group_of: dict[str, BatchGroup],
) -> None:
    """A group the sets do not express, host by host over what is left."""
    by_code: dict[str, list[int]] = {}
    for pos in list(left.positions()):
        code = filters.group_rejection(group, pos)
        if code is not None:
            by_code.setdefault(code, []).append(pos)
    for code, hosts in by_code.items():
        _count(tally, group_of, code, group, left.reject(hosts))
