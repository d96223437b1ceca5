"""The batch's index: free capacity per host and members per topology domain, built once.

Filters read it with list and dict lookups; each proposal moves it by ±1 (Nomad's
ProposedAllocs), and a proposal can be taken back, which failure simulation relies on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hvplace.coordinator.placement.groups import ConstraintGroup
from hvplace.coordinator.snapshot import Snapshot, Usage
from hvplace.proto.records import VM, Host, HostState
from hvplace.proto.selectors import LabelExpression, NodeAffinity, NodeSelectorTerm, Op


@dataclass(slots=True, eq=False)
class CandidateList:
    """Hosts to try for one node-affinity requirement, scanned round-robin from `cursor`
    so that consecutive VMs start where the previous search stopped (deterministic)."""

    hosts: list[int]
    cursor: int = 0


class HostTable:
    """What depends on the hosts alone: positions, allocatable capacity, topology domains,
    node-affinity host sets. Reused while the snapshot carries the very same Host
    records (they are frozen), so a stream of batches pays for it once."""

    def __init__(self, hosts: Sequence[Host]) -> None:
        self.source = list(hosts)
        self.hosts = sorted(self.source, key=lambda h: h.name)
        self.names = [h.name for h in self.hosts]
        self.position = {name: i for i, name in enumerate(self.names)}
        # Host.allocatable(), inlined over all hosts at once.
        self.cpu = [math.floor(h.capacity.vcpus * h.ratios.cpu) for h in self.hosts]
        self.mem = [
            max(0, math.floor(h.capacity.memory_mib * h.ratios.ram) - h.reserved_memory_mib)
            for h in self.hosts
        ]
        self.disk = [math.floor(h.capacity.disk_gib * h.ratios.disk) for h in self.hosts]
        self.alloc_cpu = [max(1, c) for c in self.cpu]
        self.alloc_mem = [max(1, m) for m in self.mem]
        self.state = [h.state for h in self.hosts]
        self.ready = [s is HostState.READY for s in self.state]
        self.lost = [p for p, s in enumerate(self.state) if s is HostState.LOST]
        self._domains: dict[str, list[str | None]] = {}
        self._domain_hosts: dict[str, dict[str, list[int]]] = {}
        self._tiers: dict[NodeAffinity, list[list[int]]] = {}
        self._admitted: dict[NodeAffinity, frozenset[int]] = {}
        self._terms: dict[NodeSelectorTerm, frozenset[int]] = {}
        self._expressions: dict[LabelExpression, frozenset[int]] = {}
        self._label_values: dict[str, dict[str | None, list[int]]] = {}

    # ------------------------------------------------------------------ topology

    def domains(self, topology_key: str) -> list[str | None]:
        found = self._domains.get(topology_key)
        if found is None:
            found = self._domains[topology_key] = [h.topology(topology_key) for h in self.hosts]
        return found

    def domain_hosts(self, topology_key: str) -> dict[str, list[int]]:
        found = self._domain_hosts.get(topology_key)
        if found is None:
            found = defaultdict(list)
            for pos, domain in enumerate(self.domains(topology_key)):
                if domain is not None:
                    found[domain].append(pos)
            self._domain_hosts[topology_key] = found
        return found

    # ------------------------------------------------------------------ node affinity

    def _expression_hosts(self, expression: LabelExpression) -> frozenset[int]:
        """Host positions where the expression holds, evaluated once per distinct label
        value (a zone has hundreds of hosts but one value), so the cost is the matches."""
        found = self._expressions.get(expression)
        if found is None:
            by_value = self._label_values.get(expression.key)
            if by_value is None:
                by_value = defaultdict(list)
                for pos, host in enumerate(self.hosts):
                    by_value[host.label(expression.key)].append(pos)
                self._label_values[expression.key] = by_value
            matched: set[int] = set()
            if expression.operator is Op.IN:
                # The values named, looked up (a zone pair out of 100 zones: 2 lookups).
                for named in expression.values:
                    matched.update(by_value.get(named, ()))
            else:
                for value, positions in by_value.items():
                    if expression.matches_value(value):
                        matched.update(positions)
            found = self._expressions[expression] = frozenset(matched)
        return found

    def term_hosts(self, term: NodeSelectorTerm) -> frozenset[int]:
        """Hosts matching every expression of the term (AND)."""
        found = self._terms.get(term)
        if found is None:
            sets = sorted((self._expression_hosts(e) for e in term.match_expressions), key=len)
            if not sets:
                found = frozenset(range(len(self.hosts)))
            else:
                found = sets[0].intersection(*sets[1:])
            self._terms[term] = found
        return found

    def admitted(self, affinity: NodeAffinity) -> frozenset[int] | None:
        """Hosts the required node affinity admits (any term, OR); None admits all."""
        if not affinity.required:
            return None
        found = self._admitted.get(affinity)
        if found is None:
            found = frozenset().union(*(self.term_hosts(t) for t in affinity.required))
            self._admitted[affinity] = found
        return found

    def node_score(self, affinity: NodeAffinity, pos: int) -> int:
        """The summed weights of the preferred terms the host matches."""
        return sum(p.weight for p in affinity.preferred if pos in self.term_hosts(p.term))

    def tiers(self, affinity: NodeAffinity) -> list[list[int]]:
        """Hosts the requirement admits, in tiers of preferred-term score (best first):
        a host of a better tier always outscores one of a worse tier."""
        found = self._tiers.get(affinity)
        if found is None:
            admitted = self.admitted(affinity)
            hosts = list(range(len(self.hosts))) if admitted is None else sorted(admitted)
            if not affinity.preferred:
                found = [hosts]
            else:
                scores: dict[int, int] = defaultdict(int)
                for preferred in affinity.preferred:
                    matching = self.term_hosts(preferred.term)
                    if len(matching) <= len(hosts):
                        chosen: Iterable[int] = matching
                    else:
                        chosen = (pos for pos in hosts if pos in matching)
                    for pos in chosen:
                        scores[pos] += preferred.weight
                tiers: dict[int, list[int]] = defaultdict(list)
                for pos in hosts:
                    tiers[scores.get(pos, 0)].append(pos)
                found = [tiers[s] for s in sorted(tiers, reverse=True)]
            self._tiers[affinity] = found
        return found


class BaseFree:
    """Free capacity per host position after the counters' placements (no overlay)."""

    def __init__(self, table: HostTable, usage: Usage) -> None:
        self.cpu = table.cpu.copy()
        self.mem = table.mem.copy()
        self.disk = table.disk.copy()
        self.sync(table, usage, usage.used)

    def sync(self, table: HostTable, usage: Usage, hosts: Iterable[str]) -> None:
        position = table.position
        for host in hosts:
            pos = position.get(host)
            if pos is None:
                continue
            cpu, mem, disk = usage.used.get(host, (0, 0, 0))
            self.cpu[pos] = table.cpu[pos] - cpu
            self.mem[pos] = table.mem[pos] - mem
            self.disk[pos] = table.disk[pos] - disk


def base_free(table: HostTable, usage: Usage) -> BaseFree:
    """The free arrays for `table`, brought up to date for the hosts that moved."""
    free: BaseFree
    free, dirty = usage.kept("free", table, lambda: BaseFree(table, usage))
    if dirty:
        free.sync(table, usage, dirty)
        dirty.clear()
    return free


class BatchGroup:
    """A constraint group as one batch counts it: members per topology domain and how
    many domains hold one, starting from the snapshot and moved by ±1 per proposal.
    The group itself stays as compiled (frozen); its other fields read through."""

    __slots__ = (
        "anti",
        "counts",
        "domain_of",
        "group",
        "key",
        "max_per_domain",
        "occupied",
        "required",
        "spread_target",
        "topology_key",
    )

    def __init__(self, group: ConstraintGroup, domain_of: list[str | None]) -> None:
        self.group = group
        # The fields the filters read per host, copied for speed.
        self.key = group.key
        self.anti = group.anti
        self.required = group.required
        self.max_per_domain = group.max_per_domain
        self.spread_target = group.spread_target
        self.topology_key = group.topology_key
        self.domain_of = domain_of
        """Per host position: the host's domain for `topology_key`."""
        self.counts: dict[str, int] = {}
        self.occupied = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)


class ClusterIndex:
    """Hosts by position (sorted by name, so position order is the name tie-break)."""

    def __init__(
        self,
        snapshot: Snapshot,
        vms: Mapping[str, VM],
        groups: Sequence[ConstraintGroup],
        lost_hosts: Collection[str] = (),
        uncounted: Collection[str] = (),
    ) -> None:
        """`lost_hosts` take nothing and their VMs no longer count; `uncounted` VM keys
        (a VM being explained where it runs now) do not count either."""
        self.vms = vms
        table = self.table = host_table(snapshot)
        self.hosts = table.hosts
        self.names = table.names
        self.position = table.position
        lost = self._lost = set(lost_hosts)
        self.state = table.state.copy()
        self.ready = table.ready.copy()
        for name in lost:
            at = self.position.get(name)
            if at is not None:
                self.state[at] = HostState.LOST
                self.ready[at] = False
        self.free_cpu = table.cpu.copy()
        self.free_mem = table.mem.copy()
        self.free_disk = table.disk.copy()
        self.alloc_cpu = table.alloc_cpu
        self.alloc_mem = table.alloc_mem
        self.domains = table.domains
        self.domain_hosts = table.domain_hosts
        self.admitted = table.admitted
        self.term_hosts = table.term_hosts
        self.node_score = table.node_score
        self._candidates: dict[NodeAffinity, list[CandidateList]] = {}
        # Each revision starts its round-robin somewhere else (Knuth's multiplicative
        # hash), so successive batches spread over the fleet instead of refilling host 0.
        self._start = (snapshot.revision * 2654435761) & 0xFFFFFFFF

        self._placements = snapshot.placements
        self._reservations = snapshot.reservations
        self._skip = set(uncounted)
        # VM key -> groups whose counts leave it out (see `add`).
        self._uncounted_in: dict[str, Collection[str]] = {}
        # Where a VM sits (placement, reservation, proposals) by host position, filled
        # on first use: most VMs are in no group and only their capacity matters.
        self.where: dict[str, list[int]] = {}
        free_cpu, free_mem, free_disk = self.free_cpu, self.free_mem, self.free_disk
        position, skip = self.position, self._skip
        get_pos, get_vm = position.get, vms.get
        kept = snapshot.usage() if vms is snapshot.vms else None
        if kept is not None:
            # Capacity used per host as the cache keeps it, then the keys laid over it
            # (plans in flight, the request's own VMs) and the uncounted ones: undo the
            # counted record, apply the shown one. O(hosts + what changed).
            usage, overlay = kept
            base = base_free(table, usage)
            self.free_cpu = free_cpu = base.cpu.copy()
            self.free_mem = free_mem = base.mem.copy()
            self.free_disk = free_disk = base.disk.copy()
            for host in lost:
                pos = get_pos(host)
                if pos is not None:
                    free_cpu[pos] = table.cpu[pos]
                    free_mem[pos] = table.mem[pos]
                    free_disk[pos] = table.disk[pos]
            derived = snapshot.derived
            assert derived is not None
            base_where, base_vms = derived.placements, derived.vms
            for key in {*overlay, *skip}:
                for where, specs, sign in (
                    (base_where, base_vms, -1),
                    (snapshot.placements, vms, 1),
                ):
                    on = where.get(key)
                    spec = specs.get(key)
                    if on is None or spec is None or on in lost:
                        continue
                    if sign > 0 and key in skip:
                        continue
                    pos = get_pos(on)
                    if pos is None:
                        continue
                    r = spec.resources
                    free_cpu[pos] -= sign * r.vcpus
                    free_mem[pos] -= sign * r.memory_mib
                    free_disk[pos] -= sign * r.disk_gib
        elif not lost and not skip:
            # The common case, kept tight: this loop sees every running VM every batch.
            for key, host in snapshot.placements.items():
                pos = get_pos(host)
                vm = get_vm(key)
                if pos is None or vm is None:
                    continue
                r = vm.resources
                free_cpu[pos] -= r.vcpus
                free_mem[pos] -= r.memory_mib
                free_disk[pos] -= r.disk_gib
        else:
            for key, host in snapshot.placements.items():
                pos = get_pos(host)
                vm = get_vm(key)
                if pos is None or vm is None or host in lost or key in skip:
                    continue
                r = vm.resources
                free_cpu[pos] -= r.vcpus
                free_mem[pos] -= r.memory_mib
                free_disk[pos] -= r.disk_gib
        for key, host in snapshot.reservations.items():
            pos = get_pos(host)
            vm = get_vm(key)
            if pos is None or vm is None or host in lost or key in skip:
                continue
            if snapshot.placements.get(key) == host:
                continue  # a reservation on its own host holds nothing more
            r = vm.resources
            free_cpu[pos] -= r.vcpus
            free_mem[pos] -= r.memory_mib
            free_disk[pos] -= r.disk_gib

        self.groups = [BatchGroup(g, self.domains(g.topology_key)) for g in groups]
        self.vm_groups: dict[str, list[BatchGroup]] = defaultdict(list)
        for group in self.groups:
            for member in group.members:
                self.vm_groups[member].append(group)
                for pos in self.spots(member):
                    self._count(group, pos, 1)

    def candidates(self, affinity: NodeAffinity) -> list[CandidateList]:
        """The table's tiers with this batch's round-robin cursors; a host that is not
        ready stays in the list and the search's `ready` test skips it."""
        found = self._candidates.get(affinity)
        if found is None:
            found = [
                CandidateList(t, self._start % len(t) if t else 0)
                for t in self.table.tiers(affinity)
            ]
            self._candidates[affinity] = found
        return found

    def cursors(self) -> dict[NodeAffinity, list[tuple[CandidateList, int]]]:
        """Where every round-robin stands, for `restore_cursors`."""
        return {a: [(c, c.cursor) for c in lists] for a, lists in self._candidates.items()}

    def restore_cursors(self, saved: dict[NodeAffinity, list[tuple[CandidateList, int]]]) -> None:
        """Put the round-robins back (and drop lists made since): a failure simulation
        then answers alike whichever scenarios ran before it."""
        for affinity in [a for a in self._candidates if a not in saved]:
            del self._candidates[affinity]
        for kept in saved.values():
            for candidates, cursor in kept:
                candidates.cursor = cursor

    def spots(self, key: str) -> list[int]:
        """The host positions a VM counts on now: placement, reservation, proposals."""
        found = self.where.get(key)
        if found is None:
            found = self.where[key] = []
            if key not in self._skip:
                for source in (self._placements, self._reservations):
                    host = source.get(key)
                    pos = None if host is None or host in self._lost else self.position.get(host)
                    if pos is not None and pos not in found:
                        found.append(pos)
        return found

    # ------------------------------------------------------------------ proposals

    @staticmethod
    def _count(group: BatchGroup, pos: int, delta: int) -> None:
        domain = group.domain_of[pos]
        if domain is None:
            return
        counts = group.counts
        before = counts.get(domain, 0)
        after = before + delta
        if after:
            counts[domain] = after
        else:
            del counts[domain]
        if before == 0:
            group.occupied += 1
        elif after == 0:
            group.occupied -= 1

    def add(self, vm: VM, pos: int, uncounted_in: Collection[str] = ()) -> None:
        """Propose `vm` on the host at `pos`. The groups named in `uncounted_in` do not
        count it (a member that knowingly breaks an affinity after a failure: the
        group's domain stays where the members that keep the rule run)."""
        if uncounted_in:
            self._uncounted_in[vm.key] = uncounted_in
        self._move(vm, pos, 1)
        self.spots(vm.key).append(pos)

    def remove(self, vm: VM, pos: int) -> None:
        """Take back a proposal or a placement (the VM's host failed)."""
        self._move(vm, pos, -1)
        self.spots(vm.key).remove(pos)

    def _move(self, vm: VM, pos: int, delta: int) -> None:
        r = vm.resources
        self.free_cpu[pos] -= delta * r.vcpus
        self.free_mem[pos] -= delta * r.memory_mib
        self.free_disk[pos] -= delta * r.disk_gib
        uncounted = self._uncounted_in.get(vm.key, ())
        for group in self.vm_groups.get(vm.key, ()):
            if group.key not in uncounted:
                self._count(group, pos, delta)

    def set_lost(self, pos: int, lost: bool) -> None:
        """Mark a host lost (or back) for a failure simulation."""
        self.state[pos] = HostState.LOST if lost else self.hosts[pos].state
        self.ready[pos] = self.state[pos] is HostState.READY


def host_table(snapshot: Snapshot) -> HostTable:
    """The table for the snapshot's hosts: kept by the snapshot's counters while the same
    (immutable) hosts map comes back, else built (no module-level cache)."""
    derived = snapshot.derived
    if derived is None:
        return HostTable(list(snapshot.hosts.values()))
    found: HostTable = derived.usage.host_table(
        snapshot.hosts, lambda hosts: HostTable(list(hosts.values()))
    )
    return found
