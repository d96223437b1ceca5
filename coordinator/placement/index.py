"""The batch's index: free capacity per host and members per topology domain, built once.

Filters read it with list and dict lookups; each proposal moves it by ±1 (Nomad's
ProposedAllocs), and a proposal can be taken back, which failure simulation relies on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from hvplace.coordinator.placement.groups import ConstraintGroup
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.models import VM, HostState, LabelExpression, NodeAffinity, NodeSelectorTerm


@dataclass(slots=True, eq=False)
class CandidateList:
    """Hosts to try for one node-affinity requirement, scanned round-robin from `cursor`
    so that consecutive VMs start where the previous search stopped (deterministic)."""

    hosts: list[int]
    cursor: int = 0


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
        self.snapshot_hosts = snapshot.hosts
        self.hosts = [snapshot.hosts[name] for name in sorted(snapshot.hosts)]
        self.names = [h.name for h in self.hosts]
        self.position = {name: i for i, name in enumerate(self.names)}
        lost = set(lost_hosts)
        self.state = [HostState.LOST if h.name in lost else h.state for h in self.hosts]
        self.ready = [s is HostState.READY for s in self.state]
        allocatable = [h.allocatable() for h in self.hosts]
        self.alloc_cpu = [max(1, a.vcpus) for a in allocatable]
        self.alloc_mem = [max(1, a.memory_mib) for a in allocatable]
        self.free_cpu = [a.vcpus for a in allocatable]
        self.free_mem = [a.memory_mib for a in allocatable]
        self.free_disk = [a.disk_gib for a in allocatable]
        self._domains: dict[str, list[str | None]] = {}
        self._domain_hosts: dict[str, dict[str, list[int]]] = {}
        self._candidates: dict[NodeAffinity, list[CandidateList]] = {}
        self._admitted: dict[NodeAffinity, frozenset[int]] = {}
        self._terms: dict[NodeSelectorTerm, frozenset[int]] = {}
        self._expressions: dict[LabelExpression, frozenset[int]] = {}
        self._label_values: dict[str, dict[str | None, list[int]]] = {}

        skip = set(uncounted)
        # Where every counted VM sits (placement and reservation), by host position.
        self.where: dict[str, list[int]] = {}
        for source in (snapshot.placements, snapshot.reservations):
            for key, host in source.items():
                pos = self.position.get(host)
                if pos is None or key in skip or host in lost:
                    continue
                spots = self.where.setdefault(key, [])
                if pos not in spots:
                    spots.append(pos)
        free_cpu, free_mem, free_disk = self.free_cpu, self.free_mem, self.free_disk
        for key, spots in self.where.items():
            vm = vms.get(key)
            if vm is None:
                continue
            r = vm.resources
            for pos in spots:
                free_cpu[pos] -= r.vcpus
                free_mem[pos] -= r.memory_mib
                free_disk[pos] -= r.disk_gib

        self.groups = list(groups)
        self.vm_groups: dict[str, list[ConstraintGroup]] = defaultdict(list)
        for group in self.groups:
            group.domain_of = self.domains(group.topology_key)
            group.counts = {}
            group.occupied = 0
            for member in group.members:
                self.vm_groups[member].append(group)
                for pos in self.where.get(member, ()):
                    self._count(group, pos, 1)

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

    def candidates(self, affinity: NodeAffinity) -> list[CandidateList]:
        """Ready hosts the requirement admits, in tiers of preferred-term score (best
        first): a host of a better tier always outscores one of a worse tier."""
        found = self._candidates.get(affinity)
        if found is None:
            admitted = self.admitted(affinity)
            ready = self.ready
            if admitted is None:
                hosts = [pos for pos in range(len(self.hosts)) if ready[pos]]
            else:
                hosts = sorted(pos for pos in admitted if ready[pos])
            if not affinity.preferred:
                found = [CandidateList(hosts)]
            else:
                scores: dict[int, int] = defaultdict(int)
                for preferred in affinity.preferred:
                    for pos in self.term_hosts(preferred.term):
                        scores[pos] += preferred.weight
                tiers: dict[int, list[int]] = defaultdict(list)
                for pos in hosts:
                    tiers[scores.get(pos, 0)].append(pos)
                found = [CandidateList(tiers[s]) for s in sorted(tiers, reverse=True)]
            self._candidates[affinity] = found
        return found

    # ------------------------------------------------------------------ proposals

    @staticmethod
    def _count(group: ConstraintGroup, pos: int, delta: int) -> None:
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

    def add(self, vm: VM, pos: int) -> None:
        """Propose `vm` on the host at `pos`."""
        self._move(vm, pos, 1)
        self.where.setdefault(vm.key, []).append(pos)

    def remove(self, vm: VM, pos: int) -> None:
        """Take back a proposal or a placement (the VM's host failed)."""
        self._move(vm, pos, -1)
        spots = self.where[vm.key]
        spots.remove(pos)
        if not spots:
            del self.where[vm.key]

    def _move(self, vm: VM, pos: int, delta: int) -> None:
        r = vm.resources
        self.free_cpu[pos] -= delta * r.vcpus
        self.free_mem[pos] -= delta * r.memory_mib
        self.free_disk[pos] -= delta * r.disk_gib
        for group in self.vm_groups.get(vm.key, ()):
            self._count(group, pos, delta)

    def set_lost(self, pos: int, lost: bool) -> None:
        """Mark a host lost (or back) for a failure simulation."""
        self.state[pos] = HostState.LOST if lost else self.hosts[pos].state
        self.ready[pos] = self.state[pos] is HostState.READY
