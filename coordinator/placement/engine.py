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
from hvplace.coordinator.placement.groups import ConstraintGroup, compile_groups
from hvplace.coordinator.placement.index import ClusterIndex
from hvplace.coordinator.placement.membership import hold_split_affinity
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.models import (
    VM,
    Explanation,
    HAPriority,
    LabelExpression,
    NodeAffinity,
    OnFailure,
    ReasonCount,
    Resources,
)

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
) -> tuple[list[ConstraintGroup], list[ConstraintGroup]]:
    required: list[ConstraintGroup] = []
    preferred: list[ConstraintGroup] = []
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
    found: list[int] = []

    # A required affinity whose members already run somewhere: only that domain can do.
    for group in required:
        if not group.anti and group.occupied:
            admitted = index.admitted(affinity)
            by_domain = index.domain_hosts(group.topology_key)
            pool = sorted(pos for domain in group.counts for pos in by_domain.get(domain, ()))
            found = [
                pos
                for pos in pool
                if (admitted is None or pos in admitted) and fits(index, pos, need, required)
            ]
            return _best(index, found, need, affinity, preferred)

    limit = FEASIBLE_LIMIT_PREFERRED if preferred or affinity.preferred else FEASIBLE_LIMIT
    seen: set[int] = set()
    for group in preferred:
        if not group.anti and group.occupied:
            admitted = index.admitted(affinity)
            by_domain = index.domain_hosts(group.topology_key)
            for domain in sorted(group.counts):
                for pos in by_domain.get(domain, ())[:HINT_HOSTS]:
                    if (
                        pos not in seen
                        and (admitted is None or pos in admitted)
                        and fits(index, pos, need, required)
                    ):
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
            if pos in seen or not fits(index, pos, need, required):
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
    preferred: Sequence[ConstraintGroup],
) -> int | None:
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    best_pos = -1
    best_score = 0.0
    for pos in found:
        value = scorers.score(index, pos, need, affinity, preferred)
        # Ties go to the lower position, i.e. the host name sorting first.
        if best_pos < 0 or value > best_score or (value == best_score and pos < best_pos):
            best_pos, best_score = pos, value
    return best_pos


# --------------------------------------------------------------------------- explain


def _affinity_text(affinity: NodeAffinity) -> str:
    def term(exprs: tuple[LabelExpression, ...]) -> str:
        return " and ".join(str(e) for e in exprs)

    return " or ".join(f"({term(t.match_expressions)})" for t in affinity.required)


def _message(code: str, group: ConstraintGroup | None, vm: VM, most_free: int) -> str:
    need = vm.resources
    if code == reasons.HOST_CORDONED:
        return "host cordoned"
    if code == reasons.HOST_DRAINING:
        return "host draining"
    if code == reasons.HOST_LOST:
        return "host lost"
    if code == reasons.HOST_DEGRADED:
        return "host degraded (libvirt unusable)"
    if code == reasons.NODE_AFFINITY:
        return f"node affinity mismatch (requires {_affinity_text(vm.node_affinity)})"
    if code == reasons.INSUFFICIENT_MEMORY:
        return f"insufficient memory (need {need.memory_mib} MiB, free {most_free})"
    if code == reasons.INSUFFICIENT_CPU:
        return f"insufficient cpu (need {need.vcpus} vCPUs, free {most_free})"
    if code == reasons.INSUFFICIENT_DISK:
        return f"insufficient disk (need {need.disk_gib} GiB, free {most_free})"
    assert group is not None
    word = group.domain_word()
    if code == reasons.TOPOLOGY_LABEL_MISSING:
        return f"no `{group.topology_key}` label, needed by {group.title}"
    if code == reasons.SPREAD:
        return (
            f"{group.title} (spread: {group.occupied} of {group.spread_target} {word}s hold a"
            f" member; no {word} takes a second before {group.spread_target} do)"
        )
    if code == reasons.AFFINITY:
        where = ", ".join(sorted(group.counts))
        return f"{group.title} (members run in {word} {where})"
    if group.policy:
        return (
            f"{group.title} ({group.bound_text()}; a scope spread lets same-label VMs share hosts)"
        )
    return f"{group.title} ({group.bound_text()})"


def explanation_at(
    index: ClusterIndex, vm: VM, ignore: frozenset[str] = frozenset()
) -> Explanation:
    """Every host against every filter, in FILTER_ORDER; a host counts under its first
    rejection, and hosts rejected alike are grouped."""
    required, _preferred = _split_groups(index, vm, ignore)
    need = vm.resources
    tally: dict[tuple[str, str], list[int]] = {}
    group_of: dict[str, ConstraintGroup] = {}
    feasible = 0
    free_of = {
        reasons.INSUFFICIENT_MEMORY: index.free_mem,
        reasons.INSUFFICIENT_CPU: index.free_cpu,
        reasons.INSUFFICIENT_DISK: index.free_disk,
    }
    admitted = index.admitted(vm.node_affinity)
    for pos in range(len(index.hosts)):
        group_key = ""
        code = filters.host_state(index, pos)
        if code is None and admitted is not None and pos not in admitted:
            code = reasons.NODE_AFFINITY  # filters.node_affinity, with the set hoisted
        if code is None:
            rejected = filters.rules(pos, required)
            if rejected is not None:
                code, group = rejected
                group_key = group.key
                group_of[group_key] = group
        if code is None:
            code = filters.capacity(index, pos, need)
        if code is None:
            feasible += 1
            continue
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
            message=_message(code, group_of.get(group_key), vm, most_free),
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
    vms = dict(snapshot.vms)
    for vm in focus:
        vms[vm.key] = vm
    groups = compile_groups(vms, snapshot.rules.values(), snapshot.policies.values(), focus)
    return ClusterIndex(snapshot, vms, groups, lost_hosts=tuple(lost_hosts))


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
    vms = dict(snapshot.vms)
    vms[vm.key] = vm
    groups = compile_groups(vms, snapshot.rules.values(), snapshot.policies.values(), [vm])
    index = ClusterIndex(snapshot, vms, groups, uncounted=(vm.key,))
    return explanation_at(index, vm)


# --------------------------------------------------------------------------- failover


def degradable(index: ClusterIndex, vm: VM) -> frozenset[str]:
    return frozenset(
        g.key
        for g in index.vm_groups.get(vm.key, ())
        if g.required and g.on_failure is OnFailure.DEGRADE
    )


def ha_order(vms: Iterable[VM]) -> list[VM]:
    """Re-placement order after a failure: high, medium, low, then off; by key within."""
    return sorted(vms, key=lambda vm: (vm.ha_priority.rank, vm.key))


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
