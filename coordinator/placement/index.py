"""The batch's index: free capacity per host and members per topology domain, built once.

Filters read it with list and dict lookups; each proposal moves it by ±1 (Nomad's
ProposedAllocs), and a proposal can be taken back, which failure simulation relies on.
"""

from __future__ import annotations

import itertools
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
        self._unlabelled: dict[str, frozenset[int]] = {}
        self._tiers: dict[NodeAffinity, list[list[int]]] = {}
        self._admitted: dict[NodeAffinity, frozenset[int]] = {}
        self._terms: dict[NodeSelectorTerm, frozenset[int]] = {}
        self._expressions: dict[LabelExpression, frozenset[int]] = {}
        self._label_values: dict[str, dict[str | None, list[int]]] = {}
        self._splits: dict[tuple[str, str, int], tuple[list[int], list[int]]] = {}

    # ------------------------------------------------------------------ topology

    def domains(self, topology_key: str) -> list[str | None]:
        found = self._domains.get(topology_key)
        if found is None:
            found = self._domains[topology_key] = [h.topology(topology_key) for h in self.hosts]
        return found

    def unlabelled(self, topology_key: str) -> frozenset[int]:
        """Positions of the hosts without a domain for `topology_key`."""
        found = self._unlabelled.get(topology_key)
        if found is None:
            domains = self.domains(topology_key)
            found = frozenset(p for p, d in enumerate(domains) if d is None)
            self._unlabelled[topology_key] = found
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
            by_value = self._by_value(expression.key)
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
            elif len(sets) == 1:
                found = sets[0]
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
            if len(affinity.required) == 1:
                found = self.term_hosts(affinity.required[0])
            else:
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
            found = self._tiers[affinity] = self._tiers_of(affinity)
        return found

    def _by_value(self, key: str) -> dict[str | None, list[int]]:
        """Host positions per value of the label `key` (ascending)."""
        by_value = self._label_values.get(key)
        if by_value is None:
            by_value = defaultdict(list)
            for pos, host in enumerate(self.hosts):
                by_value[host.label(key)].append(pos)
            self._label_values[key] = by_value
        return by_value

    def _split(self, key: str, value: str, matching: frozenset[int]) -> tuple[list[int], list[int]]:
        """The hosts with `key=value`, split into those in `matching` and the others
        (kept per value: a zone is split once, whichever zone pair names it)."""
        cache_key = (key, value, id(matching))  # `matching` is kept by _terms
        found = self._splits.get(cache_key)
        if found is None:
            hosts = self._by_value(key).get(value, [])
            met = [pos for pos in hosts if pos in matching]
            unmet = [pos for pos in hosts if pos not in matching]
            found = self._splits[cache_key] = (met, unmet)
        return found

    def search_lists(
        self, affinity: NodeAffinity
    ) -> tuple[list[list[int]], list[tuple[int, frozenset[int]]]]:
        """`tiers` and `terms` for a search. The usual shape is merged afresh from
        per-value lists (cheaper than hashing the affinity, and a table does not keep a
        list per distinct affinity); other shapes come from `tiers`' cache."""
        terms = self.terms(affinity)
        quick = self._in_tiers(affinity, terms)
        return (self.tiers(affinity) if quick is None else quick), terms

    def _in_tiers(
        self, affinity: NodeAffinity, terms: list[tuple[int, frozenset[int]]]
    ) -> list[list[int]] | None:
        """Tiers for the usual shape, one required `key In (values)` and at most one
        preferred term, merged from per-value host lists (no set of the admitted hosts
        is built); None for any other shape."""
        if len(affinity.required) != 1 or len(affinity.preferred) > 1:
            return None
        expressions = affinity.required[0].match_expressions
        if len(expressions) != 1 or expressions[0].operator is not Op.IN:
            return None
        expression = expressions[0]
        values = list(dict.fromkeys(expression.values))
        if not affinity.preferred:
            by_value = self._by_value(expression.key)
            runs = [by_value[v] for v in values if v in by_value]
            return [sorted(itertools.chain.from_iterable(runs))]
        weight, matching = terms[0]
        splits = [self._split(expression.key, v, matching) for v in values]
        met = sorted(itertools.chain.from_iterable(m for m, _u in splits))
        unmet = sorted(itertools.chain.from_iterable(u for _m, u in splits))
        if weight == 0:
            split = [sorted(met + unmet)]
        else:
            split = [met, unmet] if weight > 0 else [unmet, met]
        return [tier for tier in split if tier]

    def _tiers_of(self, affinity: NodeAffinity) -> list[list[int]]:
        quick = self._in_tiers(affinity, self.terms(affinity))
        if quick is not None:
            return quick
        admitted = self.admitted(affinity)
        if not affinity.preferred:
            return [list(range(len(self.hosts))) if admitted is None else sorted(admitted)]
        if len(affinity.preferred) == 1:
            # One term splits the hosts in two: set operations, no pass over the hosts.
            weight = affinity.preferred[0].weight
            matching = self.term_hosts(affinity.preferred[0].term)
            if admitted is None:
                met = sorted(matching)
                unmet = sorted(set(range(len(self.hosts))).difference(matching))
            else:
                met = sorted(admitted.intersection(matching))
                unmet = sorted(admitted.difference(matching))
            if weight == 0:
                split = [sorted(met + unmet)]
            else:
                split = [met, unmet] if weight > 0 else [unmet, met]
            return [tier for tier in split if tier]
        hosts = list(range(len(self.hosts))) if admitted is None else sorted(admitted)
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
        return [tiers[s] for s in sorted(tiers, reverse=True)]

    def terms(self, affinity: NodeAffinity) -> list[tuple[int, frozenset[int]]]:
        """The preferred terms as (weight, hosts matching), for scoring."""
        return [(p.weight, self.term_hosts(p.term)) for p in affinity.preferred]


class NodeView:
    """One node affinity as a batch searches it, looked up once per VM: the candidate
    tiers with their round-robin cursors, the preferred terms as (weight, hosts) for
    scoring, and (on first use: the tiers' scan does not need it) the set of hosts its
    requirement admits, None when it admits all."""

    __slots__ = ("_admitted", "_known", "affinity", "candidates", "table", "terms")

    def __init__(
        self,
        table: HostTable,
        affinity: NodeAffinity,
        candidates: list[CandidateList],
        terms: list[tuple[int, frozenset[int]]],
    ) -> None:
        self.table = table
        self.affinity = affinity
        self.candidates = candidates
        self.terms = terms
        self._admitted: frozenset[int] | None = None
        self._known = not affinity.required

    @property
    def admitted(self) -> frozenset[int] | None:
        if not self._known:
            self._admitted = self.table.admitted(self.affinity)
            self._known = True
        return self._admitted


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
        self.batch_specs: Mapping[str, VM] = {}
        """Specs of a batch not laid over `vms` (engine.place), read before `vms`."""
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
        kept = snapshot.usage() if vms is snapshot.vms else None
        if kept is None:
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
        self._views: dict[NodeAffinity, NodeView] = {}
        self._plain: NodeView | None = None
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
        position, skip = self.position, self._skip
        get_pos, get_vm = position.get, vms.get
        if kept is None:
            free_cpu, free_mem, free_disk = self.free_cpu, self.free_mem, self.free_disk
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
        vm_groups, known, spots, count = self.vm_groups, self.where, self.spots, self._count
        for group in self.groups:
            for member in group.members:
                vm_groups[member].append(group)
                held = known.get(member)
                for spot in spots(member) if held is None else held:
                    count(group, spot, 1)

    def node(self, affinity: NodeAffinity) -> NodeView:
        """The affinity's view for this batch: the table's host sets and tiers with this
        batch's round-robin cursors; a host that is not ready stays in the lists and the
        search's `ready` test skips it."""
        plain = not affinity.required and not affinity.preferred
        if plain and self._plain is not None:
            return self._plain
        found = self._views.get(affinity)
        if found is None:
            table = self.table
            tiers, terms = table.search_lists(affinity)
            start = self._start
            found = NodeView(
                table,
                affinity,
                [CandidateList(t, start % len(t) if t else 0) for t in tiers],
                terms,
            )
            self._views[affinity] = found
        if plain:
            self._plain = found
        return found

    def candidates(self, affinity: NodeAffinity) -> list[CandidateList]:
        """The affinity's candidate tiers with this batch's round-robin cursors."""
        return self.node(affinity).candidates

    def cursors(self) -> dict[NodeAffinity, list[tuple[CandidateList, int]]]:
        """Where every round-robin stands, for `restore_cursors`."""
        return {a: [(c, c.cursor) for c in v.candidates] for a, v in self._views.items()}

    def restore_cursors(self, saved: dict[NodeAffinity, list[tuple[CandidateList, int]]]) -> None:
        """Put the round-robins back (and drop lists made since): a failure simulation
        then answers alike whichever scenarios ran before it."""
        for affinity in [a for a in self._views if a not in saved]:
            del self._views[affinity]
        self._plain = None
        for kept in saved.values():
            for candidates, cursor in kept:
                candidates.cursor = cursor

    @property
    def start(self) -> int:
        """Where this batch's round-robins start (see `_start`)."""
        return self._start

    def spec(self, key: str) -> VM | None:
        """A VM's spec as this index sees it: the batch's, else the snapshot's."""
        found = self.batch_specs.get(key)
        return self.vms.get(key) if found is None else found

    def spots(self, key: str) -> list[int]:
        """The host positions a VM counts on now: placement, reservation, proposals."""
        found = self.where.get(key)
        if found is None:
            found = self.where[key] = []
            if key not in self._skip:
                for host in (self._placements.get(key), self._reservations.get(key)):
                    if host is None or host in self._lost:
                        continue
                    pos = self.position.get(host)
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
        key = vm.key
        if uncounted_in:
            self._uncounted_in[key] = uncounted_in
        self._move(vm, key, pos, 1)
        self.spots(key).append(pos)

    def remove(self, vm: VM, pos: int) -> None:
        """Take back a proposal or a placement (the VM's host failed)."""
        key = vm.key
        self._move(vm, key, pos, -1)
        self.spots(key).remove(pos)

    def _move(self, vm: VM, key: str, pos: int, delta: int) -> None:
        r = vm.resources
        self.free_cpu[pos] -= delta * r.vcpus
        self.free_mem[pos] -= delta * r.memory_mib
        self.free_disk[pos] -= delta * r.disk_gib
        groups = self.vm_groups.get(key)
        if groups:
            uncounted = self._uncounted_in.get(key, ())
            for group in groups:
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
