"""place() and explain(): filters then scores over the batch's index, a bounded search per VM.

Like Nomad's LimitIterator and k8s percentageOfNodesToScore, the search stops after a
few feasible hosts: candidates come per node-affinity requirement, scanned round-robin
from where the previous VM stopped; only a VM that fits nowhere costs a full scan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hvplace.coordinator.placement import filters, reasons, scorers
from hvplace.coordinator.placement.groups import compile_groups
from hvplace.coordinator.placement.index import BatchGroup, ClusterIndex
from hvplace.coordinator.placement.membership import hold_split_affinity
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import VM, Explanation, ReasonCount, Resources
from hvplace.proto.selectors import NodeAffinity

FEASIBLE_LIMIT = 3
"""Feasible hosts scored per VM without preferences (Nomad scores 2 for services)."""
FEASIBLE_LIMIT_PREFERRED = 8
"""With preferred rules or node-affinity terms, look a little wider for a good host."""
HINT_HOSTS = 16
"""Hosts taken from each domain a preferred affinity points at, tried before the scan."""


@dataclass(frozen=True, slots=True)
class Batch:
    vms: tuple[VM, ...]
    atomic: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    """The engine's answer. `assignments` holds only new placements (VM key → host)."""

    revision: int
    assignments: Mapping[str, str] = field(default_factory=dict)
    pending: Mapping[str, Explanation] = field(default_factory=dict)
    degraded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


# --------------------------------------------------------------------------- search


def _split_groups(
    index: ClusterIndex, vm: VM, ignore: frozenset[str]
) -> tuple[list[BatchGroup], list[BatchGroup]]:
    required: list[BatchGroup] = []
    preferred: list[BatchGroup] = []
    for group in index.vm_groups.get(vm.key, ()):
        if not group.required:
            preferred.append(group)
        elif group.key not in ignore:
            required.append(group)
    return required, preferred


def search(index: ClusterIndex, vm: VM, ignore: frozenset[str] = frozenset()) -> int | None:
    """The best feasible host position for `vm`, or None when no host passes the filters.

    `ignore` names required groups to leave out (failover under on_failure=degrade).
    """
    required, preferred = _split_groups(index, vm, ignore)
    need = vm.resources
    affinity = vm.node_affinity
    fits = filters.fits
    ask = filters.ask(index, vm, required)
    found: list[int] = []

    # A required affinity whose members already run somewhere: only that domain can do.
    for group in required:
        if not group.anti and group.occupied:
            by_domain = index.domain_hosts(group.topology_key)
            pool = sorted(pos for domain in group.counts for pos in by_domain.get(domain, ()))
            found = [pos for pos in pool if fits(index, pos, ask)]
            return _best(index, found, need, affinity, preferred)

    limit = FEASIBLE_LIMIT_PREFERRED if preferred or affinity.preferred else FEASIBLE_LIMIT
    seen: set[int] = set()
    for group in preferred:
        if not group.anti and group.occupied:
            by_domain = index.domain_hosts(group.topology_key)
            for domain in sorted(group.counts):
                for pos in by_domain.get(domain, ())[:HINT_HOSTS]:
                    if pos not in seen and fits(index, pos, ask):
                        seen.add(pos)
                        found.append(pos)

    for tier in index.candidates(affinity):
        hosts = tier.hosts
        size = len(hosts)
        start = tier.cursor
        for step in range(size):
            at = start + step
            if at >= size:
                at -= size
            pos = hosts[at]
            if pos in seen or not fits(index, pos, ask):
                continue
            found.append(pos)
            if len(found) >= limit:
                tier.cursor = at + 1 if at + 1 < size else 0
                break
        if found:
            break
    return _best(index, found, need, affinity, preferred)


def _best(
    index: ClusterIndex,
    found: Sequence[int],
    need: Resources,
    affinity: NodeAffinity,
    preferred: Sequence[BatchGroup],
) -> int | None:
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    best_pos = -1
    best_score = 0.0
    terms = scorers.node_terms(index, affinity)
    for pos in found:
        value = scorers.score(index, pos, need, terms, preferred)
        # Ties go to the lower position, i.e. the host name sorting first.
        if best_pos < 0 or value > best_score or (value == best_score and pos < best_pos):
            best_pos, best_score = pos, value
    return best_pos


# --------------------------------------------------------------------------- explain


def explanation_at(
    index: ClusterIndex, vm: VM, ignore: frozenset[str] = frozenset()
) -> Explanation:
    """Every host against the filter chain (filters.CHAIN, as the search walks it); a
    host counts under its first rejection, and hosts rejected alike are grouped."""
    required, _preferred = _split_groups(index, vm, ignore)
    ask = filters.ask(index, vm, required)
    first_rejection = filters.first_rejection
    tally: dict[tuple[str, str], list[int]] = {}
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
        entry = tally.setdefault((code, group_key), [0, -(1 << 62)])
        entry[0] += 1
        free = free_of.get(code)
        if free is not None:
            entry[1] = max(entry[1], free[pos])
    order = {code: i for i, code in enumerate(reasons.ALL_CODES)}
    rows = sorted(tally.items(), key=lambda kv: (-kv[1][0], order[kv[0][0]], kv[0][1]))
    counted = [
        ReasonCount(
            code=code,
            message=filters.message(code, group_of.get(group_key), vm, most_free),
            hosts=hosts,
            rule=group_key,
        )
        for (code, group_key), (hosts, most_free) in rows
    ]
    if not index.hosts:
        counted = [ReasonCount(code=reasons.NO_HOSTS, message="no hosts registered", hosts=0)]
    return Explanation(
        vm=vm.key, total_hosts=len(index.hosts), feasible_hosts=feasible, reasons=tuple(counted)
    )


# --------------------------------------------------------------------------- place


def _unplaced(snapshot: Snapshot, vms: Iterable[VM]) -> list[VM]:
    """The batch's VMs in order, each once, without those already placed (fixed)."""
    seen: set[str] = set()
    todo = []
    for vm in vms:
        if vm.key in seen or vm.key in snapshot.placements:
            continue
        seen.add(vm.key)
        todo.append(vm)
    return todo


def build_index(
    snapshot: Snapshot, focus: Sequence[VM], lost_hosts: Iterable[str] = ()
) -> ClusterIndex:
    """The index for placing `focus`: only the groups that contain one of them."""
    snap = snapshot.overlaid({vm.key: vm for vm in focus}, {})
    groups = compile_groups(
        snap.vms, snap.rules.values(), snap.policies.values(), focus, snap.scope_vms
    )
    return ClusterIndex(snap, snap.vms, groups, lost_hosts=tuple(lost_hosts))


def place(snapshot: Snapshot, batch: Batch) -> Plan:
    """Place the batch's unplaced VMs against the snapshot and the batch's own proposals."""
    todo = _unplaced(snapshot, batch.vms)
    index = build_index(snapshot, todo)
    assignments: dict[str, str] = {}
    pending: dict[str, Explanation] = {}
    # A VM without rules that fit nowhere stays unplaceable for the rest of the batch
    # (capacity only shrinks as the batch proceeds): skip its twins' full scans.
    hopeless: dict[tuple[Resources, NodeAffinity], Explanation] = {}
    for vm in todo:
        plain = vm.key not in index.vm_groups
        shape = (vm.resources, vm.node_affinity)
        if plain and shape in hopeless:
            pending[vm.key] = dataclasses.replace(hopeless[shape], vm=vm.key)
            continue
        pos = search(index, vm)
        if pos is None:
            why = pending[vm.key] = explanation_at(index, vm)
            if plain:
                hopeless[shape] = why
            continue
        index.add(vm, pos)
        assignments[vm.key] = index.names[pos]
    if batch.atomic and pending:
        return _atomic_refusal(snapshot.revision, todo, pending)
    plan = Plan(revision=snapshot.revision, assignments=assignments, pending=pending)
    return hold_split_affinity(plan, todo, snapshot.rules.values())


def _atomic_refusal(revision: int, todo: Sequence[VM], pending: Mapping[str, Explanation]) -> Plan:
    blockers = [vm.key for vm in todo if vm.key in pending]
    named = ", ".join(f"`{key}`" for key in blockers[:5])
    if len(blockers) > 5:
        named += f" and {len(blockers) - 5} more"
    held: dict[str, Explanation] = {}
    for vm in todo:
        why = pending.get(vm.key)
        if why is None:
            why = Explanation(
                vm=vm.key,
                total_hosts=0,
                feasible_hosts=0,
                reasons=(
                    ReasonCount(
                        code=reasons.ATOMIC_BATCH,
                        message=f"held back: the atomic batch cannot place {named}",
                        hosts=0,
                    ),
                ),
            )
        held[vm.key] = why
    return Plan(revision=revision, pending=held)


def explain(snapshot: Snapshot, vm: VM) -> Explanation:
    """Why `vm` can or cannot go on each host now; a placed VM is explained as if it
    were moving, so its own place does not count against it."""
    snap = snapshot.overlaid({vm.key: vm}, {})
    groups = compile_groups(
        snap.vms, snap.rules.values(), snap.policies.values(), [vm], snap.scope_vms
    )
    index = ClusterIndex(snap, snap.vms, groups, uncounted=(vm.key,))
    return explanation_at(index, vm)


# --------------------------------------------------------------------------- failover order
def ha_order(vms: Iterable[VM]) -> list[VM]:
    """Re-placement order after a failure: high, medium, low, then off; by key within.
    (Failover planning is coordinator/failure.py; admission simulates with this order.)"""
    return sorted(vms, key=lambda vm: (vm.ha_priority.rank, vm.key))
