"""place() and explain(): filters then scores over the batch's index, a bounded search per VM.

Like Nomad's LimitIterator and k8s percentageOfNodesToScore, the search stops after a
few feasible hosts: candidates come per node-affinity requirement, scanned round-robin
from where the previous VM stopped; only a VM that fits nowhere costs a full scan, and
its explanation is counted over host sets (explanation.py). The chain's filters are
tested inline here (filters.CHAIN says which, in what order; filters.fits is the
fallback should the chain grow).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hvplace.coordinator.placement import filters, reasons, scorers
from hvplace.coordinator.placement.explanation import explanation_at as explanation_at
from hvplace.coordinator.placement.groups import compile_groups
from hvplace.coordinator.placement.index import BatchGroup, ClusterIndex, NodeView
from hvplace.coordinator.placement.membership import hold_split_affinity
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import VM, Explanation, ReasonCount, Resources, Rule
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


_INLINE = tuple(f.name for f in filters.CHAIN) == (
    "host_state",
    "node_affinity",
    "rules",
    "capacity",
)
"""The search tests the chain's filters inline (a call per filter per host costs more than
the test); a chain changed without the search falls back to `filters.fits`."""


def search(
    index: ClusterIndex, vm: VM, ignore: frozenset[str] = frozenset(), key: str | None = None
) -> int | None:
    """The best feasible host position for `vm`, or None when no host passes the filters.

    `ignore` names required groups to leave out (failover under on_failure=degrade);
    `key` is the VM's key when the caller has it already.
    """
    if (vm.key if key is None else key) not in index.vm_groups and _INLINE:
        return _search_ungrouped(index, vm.resources, index.node(vm.node_affinity))
    required, preferred = _split_groups(index, vm, ignore)
    need = vm.resources
    affinity = vm.node_affinity
    view = index.node(affinity)
    ready = index.ready
    free_mem, free_cpu, free_disk = index.free_mem, index.free_cpu, index.free_disk
    mem, cpu, disk = need.memory_mib, need.vcpus, need.disk_gib
    rejection = filters.group_rejection

    def admitted_fits(pos: int) -> bool:
        """filters.fits for a host of the tiers, which the node affinity admits."""
        if not ready[pos]:
            return False
        for group in required:
            if rejection(group, pos) is not None:
                return False
        return free_mem[pos] >= mem and free_cpu[pos] >= cpu and free_disk[pos] >= disk

    def fits(pos: int) -> bool:
        """filters.fits: every filter of the chain passes."""
        admitted = view.admitted
        return (admitted is None or pos in admitted) and admitted_fits(pos)

    if not _INLINE:  # pragma: no cover - a filter added to the chain but not here
        ask = filters.ask(index, vm, required)

        def fits(pos: int) -> bool:
            return filters.fits(index, pos, ask)

        admitted_fits = fits

    found: list[int] = []

    # A required affinity whose members already run somewhere: only that domain can do.
    for group in required:
        if not group.anti and group.occupied:
            by_domain = index.domain_hosts(group.topology_key)
            pool = sorted(pos for domain in group.counts for pos in by_domain.get(domain, ()))
            found = [pos for pos in pool if fits(pos)]
            return _best(index, found, need, view.terms, preferred)

    limit = FEASIBLE_LIMIT_PREFERRED if preferred or view.terms else FEASIBLE_LIMIT

    # The first member of a required affinity whose other members are pinned by a node
    # affinity: where they can all go, if anywhere, so that they can follow it there.
    for group in required:
        if not group.anti:
            joint = _joint_hosts(index, group, vm.key if key is None else key)
            if joint:
                found = _take(joint, index.start, fits, limit)
                if found:
                    return _best(index, found, need, view.terms, preferred)
    seen: set[int] = set()
    for group in preferred:
        if not group.anti and group.occupied:
            by_domain = index.domain_hosts(group.topology_key)
            for domain in sorted(group.counts):
                for pos in by_domain.get(domain, ())[:HINT_HOSTS]:
                    if pos not in seen and fits(pos):
                        seen.add(pos)
                        found.append(pos)

    # The tiers hold admitted hosts only; a host already taken from a hint is skipped.
    plain = not required and not seen and _INLINE
    for tier in view.candidates:
        hosts = tier.hosts
        size = len(hosts)
        start = tier.cursor
        for at in itertools.chain(range(start, size), range(start)):
            pos = hosts[at]
            if plain:
                if (
                    not ready[pos]
                    or free_mem[pos] < mem
                    or free_cpu[pos] < cpu
                    or free_disk[pos] < disk
                ):
                    continue
            elif pos in seen or not admitted_fits(pos):
                continue
            found.append(pos)
            if len(found) >= limit:
                tier.cursor = at + 1 if at + 1 < size else 0
                break
        if found:
            break
    return _best(index, found, need, view.terms, preferred)


def _joint_hosts(index: ClusterIndex, group: BatchGroup, key: str) -> list[int] | None:
    """For an affinity group no member holds yet: the hosts (in position order) of the
    domains that every other unplaced member's required node affinity admits, None when
    none of them is pinned (any domain will do) or when no domain admits them all (the
    group cannot be met whatever this VM does)."""
    if group.occupied:
        return None
    table = index.table
    domain_of = group.domain_of
    allowed: set[str | None] | None = None
    for member in group.members:
        if member == key or index.spots(member):
            continue
        spec = index.spec(member)
        if spec is None or not spec.node_affinity.required:
            continue
        admitted = table.admitted(spec.node_affinity)
        assert admitted is not None
        domains = {domain_of[pos] for pos in admitted}
        allowed = domains if allowed is None else allowed & domains
        if not allowed:
            return None
    if allowed is None:
        return None
    allowed.discard(None)
    by_domain = index.domain_hosts(group.topology_key)
    return sorted(pos for domain in allowed if domain is not None for pos in by_domain[domain])


def _take(pool: Sequence[int], start: int, fits: Callable[[int], bool], limit: int) -> list[int]:
    """Up to `limit` hosts of `pool` that pass, scanned round-robin from `start`."""
    found: list[int] = []
    size = len(pool)
    first = start % size
    for at in itertools.chain(range(first, size), range(first)):
        if fits(pool[at]):
            found.append(pool[at])
            if len(found) >= limit:
                break
    return found


def _search_ungrouped(index: ClusterIndex, need: Resources, view: NodeView) -> int | None:
    """`search` for a VM in no group (most VMs): the tiers' scan with capacity and host
    state tested inline, the first `limit` hosts that pass."""
    ready = index.ready
    free_mem, free_cpu, free_disk = index.free_mem, index.free_cpu, index.free_disk
    mem, cpu, disk = need.memory_mib, need.vcpus, need.disk_gib
    limit = FEASIBLE_LIMIT_PREFERRED if view.terms else FEASIBLE_LIMIT
    found: list[int] = []
    for tier in view.candidates:
        hosts = tier.hosts
        size = len(hosts)
        for at in itertools.chain(range(tier.cursor, size), range(tier.cursor)):
            pos = hosts[at]
            if (
                ready[pos]
                and free_mem[pos] >= mem
                and free_cpu[pos] >= cpu
                and free_disk[pos] >= disk
            ):
                found.append(pos)
                if len(found) >= limit:
                    tier.cursor = at + 1 if at + 1 < size else 0
                    break
        if found:
            break
    return _best(index, found, need, view.terms, (), one_tier=True)


def _best(
    index: ClusterIndex,
    found: Sequence[int],
    need: Resources,
    terms: Sequence[tuple[int, frozenset[int]]],
    preferred: Sequence[BatchGroup],
    one_tier: bool = False,
) -> int | None:
    """The highest `scorers.score` of `found`, ties to the lower position. `one_tier`
    says the hosts come from one candidate tier, so they match the same preferred terms
    (a tier is a preferred score): the terms are then summed once."""
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    best_pos = -1
    best_score = 0.0
    if not preferred:
        # scorers.score without preferred groups, inlined (the same arithmetic).
        free_mem, free_cpu = index.free_mem, index.free_cpu
        alloc_mem, alloc_cpu = index.alloc_mem, index.alloc_cpu
        mem, cpu = need.memory_mib, need.vcpus
        scale = scorers.PREFERENCE_SCALE
        base = scale * _term_weight(terms, found[0]) if one_tier or not terms else None
        for pos in found:
            value = (scale * _term_weight(terms, pos) if base is None else base) + 50.0 * (
                (free_mem[pos] - mem) / alloc_mem[pos] + (free_cpu[pos] - cpu) / alloc_cpu[pos]
            )
            # Ties go to the lower position, i.e. the host name sorting first.
            if best_pos < 0 or value > best_score or (value == best_score and pos < best_pos):
                best_pos, best_score = pos, value
        return best_pos
    for pos in found:
        value = scorers.score(index, pos, need, terms, preferred)
        if best_pos < 0 or value > best_score or (value == best_score and pos < best_pos):
            best_pos, best_score = pos, value
    return best_pos


def _term_weight(terms: Sequence[tuple[int, frozenset[int]]], pos: int) -> int:
    preference = 0
    for weight, hosts in terms:
        if pos in hosts:
            preference += weight
    return preference


# --------------------------------------------------------------------------- place


def _unplaced(snapshot: Snapshot, vms: Iterable[VM]) -> dict[str, VM]:
    """The batch's VMs in order by key, each once, without those already placed (fixed)."""
    todo: dict[str, VM] = {}
    placements = snapshot.placements
    for vm in vms:
        key = vm.key
        if key in todo or key in placements:
            continue
        todo[key] = vm
    return todo


def build_index(
    snapshot: Snapshot, focus: Sequence[VM], lost_hosts: Iterable[str] = ()
) -> ClusterIndex:
    """The index for placing `focus`: only the groups that contain one of them."""
    return _index(snapshot, {vm.key: vm for vm in focus}, lost_hosts)


def _index(
    snapshot: Snapshot, focus: Mapping[str, VM], lost_hosts: Iterable[str] = ()
) -> ClusterIndex:
    snap = snapshot.overlaid(focus, {})
    groups = compile_groups(
        snap.vms, snap.rules.values(), snap.policies.values(), focus.values(), snap.scope_vms
    )
    return ClusterIndex(snap, snap.vms, groups, lost_hosts=tuple(lost_hosts))


def _batch_index(snapshot: Snapshot, todo: Mapping[str, VM]) -> tuple[ClusterIndex, list[Rule]]:
    """The index for a batch of unplaced VMs, and the rules of the batch's scopes.

    The batch's specs are not laid over the snapshot's maps (a spec set into an
    immutable map of 100,000 costs a path copy): unplaced, they hold no capacity, and
    the groups see them through the per-scope lists, which get them added. A VM with a
    reservation holds capacity there: such a batch is laid over as `build_index` does."""
    scopes = {vm.scope for vm in todo.values()}
    rules = [r for r in snapshot.rules.values() if r.scope in scopes]
    policies = [p for p in snapshot.policies.values() if p.scope in scopes]
    reservations = snapshot.reservations
    if reservations and any(key in reservations for key in todo):
        snap = snapshot.overlaid(todo, {})
        groups = compile_groups(snap.vms, rules, policies, todo.values(), snap.scope_vms)
        return ClusterIndex(snap, snap.vms, groups), rules

    def scope_vms(wanted: Iterable[str]) -> Mapping[str, list[VM]]:
        """Snapshot.scope_vms of the snapshot with the batch's specs laid over."""
        out = snapshot.scope_vms(wanted)
        known = snapshot.vms
        replaced: set[str] = set()
        for key, vm in todo.items():
            listed = out.get(vm.scope)
            if listed is None:
                continue
            if key in known:
                replaced.add(vm.scope)
            else:
                listed.append(vm)
        for scope in replaced:
            merged = {vm.key: vm for vm in out[scope]}
            merged.update((k, v) for k, v in todo.items() if v.scope == scope)
            out[scope] = list(merged.values())
        return out

    groups = compile_groups(
        snapshot.vms, rules, policies, todo.values(), scope_vms, focus_keys=todo.keys()
    )
    index = ClusterIndex(snapshot, snapshot.vms, groups)
    index.batch_specs = todo
    return index, rules


def place(snapshot: Snapshot, batch: Batch) -> Plan:
    """Place the batch's unplaced VMs against the snapshot and the batch's own proposals."""
    # A batch allocates and drops short-lived, acyclic state (refcounting frees it); an
    # automatic collection meanwhile would walk every record the caller holds (a full
    # one walks 100,000s of VMs: a tenth of a second at 100,000). As cache.load does,
    # the collector waits until the batch is done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _place(snapshot, batch)
    finally:
        if collecting:
            gc.enable()


def _place(snapshot: Snapshot, batch: Batch) -> Plan:
    todo = _unplaced(snapshot, batch.vms)
    index, rules = _batch_index(snapshot, todo)
    assignments: dict[str, str] = {}
    pending: dict[str, Explanation] = {}
    # A VM without rules that fit nowhere stays unplaceable for the rest of the batch
    # (capacity only shrinks as the batch proceeds): skip its twins' full scans.
    hopeless: dict[tuple[Resources, NodeAffinity], Explanation] = {}
    retry: list[tuple[str, VM]] = []
    names = index.names
    vm_groups = index.vm_groups
    for key, vm in todo.items():
        if hopeless and key not in vm_groups:
            known = hopeless.get((vm.resources, vm.node_affinity))
            if known is not None:
                pending[key] = dataclasses.replace(known, vm=key)
                continue
        pos = search(index, vm, key=key)
        if pos is None:
            if key in vm_groups:
                retry.append((key, vm))
                continue
            why = pending[key] = explanation_at(index, vm)
            hopeless[(vm.resources, vm.node_affinity)] = why
            continue
        index.add(vm, pos)
        assignments[key] = names[pos]
    # A VM held by a rule may fit once the rest of the batch is placed (a spread reached,
    # a member placed where it can follow): one more try each, in order.
    for key, vm in retry:
        pos = search(index, vm, key=key)
        if pos is None:
            pending[key] = explanation_at(index, vm)
            continue
        index.add(vm, pos)
        assignments[key] = names[pos]
    if batch.atomic and pending:
        return _atomic_refusal(snapshot.revision, list(todo.values()), pending)
    plan = Plan(revision=snapshot.revision, assignments=assignments, pending=pending)
    return hold_split_affinity(plan, list(todo.values()), rules)


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
