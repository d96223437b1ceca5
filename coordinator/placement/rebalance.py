"""The rebalancer's planning, pure: the fewest VM moves that repair every broken required
rule (SPEC §5.2, §5.7), then, within the move budget, moves that improve preferred rules.

Repair tries a greedy search of single moves first; when it repairs everything with as
many moves as a lower bound, that is the fewest. Otherwise an exact search (iterative
deepening over the set of VMs to move, each set tried against every target combination;
the end state must hold every required group, capacity, node affinity and host state)
finds the fewest, bounded by a budget of combinations; past it the greedy plan stands
and the plan says it may not be the fewest (`minimal` false). Preferred rules are then improved greedily, one move at a
time, never making a required group worse.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hvplace.coordinator.placement.groups import (
    ConstraintGroup,
    compile_groups,
    group_violations,
    host_domain,
    occupancy,
)
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import VM, Host, HostState

EXACT_BUDGET = 200_000
"""Target combinations the exact repair search may try before it falls back to greedy."""


@dataclass(frozen=True, slots=True)
class Move:
    vm: str
    source: str
    target: str
    why: str = ""


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    """`moves` in the order to carry them out: repairs first, then improvements.

    `repair_moves` of them repair required groups; `minimal` says the exact search proved
    no fewer moves can repair what they repair. `unrepaired` maps each required group
    still broken after the plan to why; `truncated` counts moves left out by the budget.
    """

    moves: tuple[Move, ...] = ()
    repair_moves: int = 0
    minimal: bool = True
    broken: tuple[str, ...] = ()
    unrepaired: Mapping[str, str] = field(default_factory=dict)
    improved: tuple[str, ...] = ()
    truncated: int = 0


def group_penalty(
    group: ConstraintGroup, where: Mapping[str, str], domain: Callable[[str], str | None]
) -> int:
    """How far the members' hosts are from holding the group; 0 exactly when
    `group_violations` finds nothing. Anti-affinity: members over each domain's bound
    plus domains missing for the spread; affinity: members outside the largest domain;
    both: members on a host without the topology label."""
    counts: Counter[str] = Counter()
    unlabeled = placed = 0
    for member in group.members:
        host = where.get(member)
        if host is None:
            continue
        placed += 1
        d = domain(host)
        if d is None:
            unlabeled += 1
        else:
            counts[d] += 1
    if group.anti:
        excess = sum(max(0, c - group.max_per_domain) for c in counts.values())
        target = min(group.spread_target, placed)
        return unlabeled + excess + max(0, target - len(counts))
    return unlabeled + (sum(counts.values()) - max(counts.values()) if counts else 0)


class _State:
    """Placements, free capacity and group membership for the search."""

    def __init__(self, snapshot: Snapshot, groups: Sequence[ConstraintGroup]) -> None:
        self.snapshot = snapshot
        self.hosts: Mapping[str, Host] = snapshot.hosts
        self.groups = list(groups)
        self.where: dict[str, str] = dict(snapshot.placements)
        self.vms: Mapping[str, VM] = snapshot.vms
        self.ready = sorted(h for h, x in self.hosts.items() if x.state is HostState.READY)
        self.free: dict[str, list[int]] = {}
        for name, host in self.hosts.items():
            a = host.allocatable()
            self.free[name] = [a.vcpus, a.memory_mib, a.disk_gib]
        for key, hosts in occupancy(snapshot.placements, snapshot.reservations).items():
            vm = self.vms.get(key)
            if vm is None:
                continue
            for h in hosts:
                if h in self.free:
                    self._take(h, vm, 1)
        self.of_vm: dict[str, list[int]] = {}
        for i, g in enumerate(self.groups):
            for m in g.members:
                self.of_vm.setdefault(m, []).append(i)
        self._domains: dict[tuple[str, str], str | None] = {}
        # Movable: placed on a live host that can stop it (not lost, not degraded), with
        # no move already in flight (a reservation).
        self.movable = sorted(
            k
            for k, h in snapshot.placements.items()
            if k in self.vms
            and k not in snapshot.reservations
            and h in self.hosts
            and self.hosts[h].state not in (HostState.LOST, HostState.DEGRADED)
        )
        self._admits: dict[tuple[str, str], bool] = {}

    def _take(self, host: str, vm: VM, sign: int) -> None:
        r = vm.resources
        f = self.free[host]
        f[0] -= sign * r.vcpus
        f[1] -= sign * r.memory_mib
        f[2] -= sign * r.disk_gib

    def fits(self, host: str, vm: VM) -> bool:
        r = vm.resources
        f = self.free[host]
        return f[0] >= r.vcpus and f[1] >= r.memory_mib and f[2] >= r.disk_gib

    def admits(self, key: str, host: str) -> bool:
        found = self._admits.get((key, host))
        if found is None:
            found = self._admits[(key, host)] = self.vms[key].node_affinity.admits(self.hosts[host])
        return found

    def domain(self, group: ConstraintGroup) -> Callable[[str], str | None]:
        key = group.topology_key

        def of(host: str) -> str | None:
            found = self._domains.get((host, key), "\0")
            if found == "\0":
                found = self._domains[(host, key)] = host_domain(self.hosts, host, key)
            return found

        return of

    def penalty(self, i: int) -> int:
        g = self.groups[i]
        return group_penalty(g, self.where, self.domain(g))

    def move(self, key: str, target: str) -> None:
        vm = self.vms[key]
        self._take(self.where[key], vm, -1)
        self._take(target, vm, 1)
        self.where[key] = target

    def targets(self, key: str) -> list[str]:
        here = self.where[key]
        return [h for h in self.ready if h != here and self.admits(key, h)]


def _required(state: _State) -> list[int]:
    return [i for i, g in enumerate(state.groups) if g.required]


@dataclass(slots=True)
class _Search:
    """One candidate set's target search: depth-first over the ready hosts."""

    state: _State
    subset: tuple[str, ...]
    sources: dict[str, str]
    touched: list[int]
    limits: Mapping[int, int]
    budget: int
    tried: int = 0
    chosen: list[str] = field(default_factory=list)

    def assign(self, pos: int) -> bool:
        state = self.state
        if pos == len(self.subset):
            self.tried += 1
            return all(state.penalty(i) <= self.limits[i] for i in self.touched)
        key = self.subset[pos]
        vm = state.vms[key]
        for host in state.ready:
            if self.tried > self.budget:
                return False
            if host == self.sources[key] or not state.admits(key, host):
                continue
            if not state.fits(host, vm):
                continue
            state._take(host, vm, 1)
            state.where[key] = host
            self.chosen.append(host)
            found = self.assign(pos + 1)
            state._take(host, vm, -1)
            del state.where[key]
            if found:
                return True
            self.chosen.pop()
        return False


def _exact(state: _State, budget: int, focus: set[int]) -> list[Move] | None:
    """The fewest moves making every required group of `focus` hold and no other
    required group worse, or None when no set of the movable VMs does or the budget ran
    out first."""
    required = set(_required(state))
    before = {i: state.penalty(i) for i in required}
    limits = {i: 0 if i in focus else before[i] for i in required}
    broken = [i for i in sorted(focus) if before[i]]
    if not broken:
        return []
    degraded = state.snapshot.degraded
    members_broken = {m for i in broken for m in state.groups[i].members}
    # Degraded VMs first (moving them clears their record), then members of broken
    # groups, then the rest (which may only make room).
    candidates = sorted(
        state.movable,
        key=lambda k: (k not in degraded, k not in members_broken, k),
    )
    broken_sets = [set(state.groups[i].members) for i in broken]
    tried = 0
    for k in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, k):
            # Only a member's move changes a group: every broken group needs one.
            if any(s.isdisjoint(subset) for s in broken_sets):
                continue
            touched = sorted({i for key in subset for i in state.of_vm.get(key, ())} & required)
            sources = {key: state.where[key] for key in subset}
            for key in subset:  # lift them all off: the room they free is usable
                state._take(sources[key], state.vms[key], -1)
                del state.where[key]
            search = _Search(state, subset, sources, touched, limits, budget - tried)
            try:
                found = search.assign(0)
            finally:
                for key in subset:
                    state.where[key] = sources[key]
                    state._take(sources[key], state.vms[key], 1)
            tried += search.tried
            if found:
                return [
                    Move(vm=key, source=sources[key], target=host)
                    for key, host in zip(subset, search.chosen, strict=True)
                ]
            if tried > budget:
                return None
    return None


def _lower_bound(state: _State, broken: Sequence[int]) -> int:
    """Moves no plan can do with fewer: a move changes one member's domain, so it takes
    one member off an over-full domain, adds one domain to a spread, or brings one
    member into an affinity's domain. Groups sharing members count once (the largest)."""
    bounds = []
    for i in broken:
        g = state.groups[i]
        domain = state.domain(g)
        counts: Counter[str] = Counter()
        unlabeled = placed = 0
        for m in g.members:
            h = state.where.get(m)
            if h is None:
                continue
            placed += 1
            d = domain(h)
            if d is None:
                unlabeled += 1
            else:
                counts[d] += 1
        if g.anti:
            excess = sum(max(0, c - g.max_per_domain) for c in counts.values())
            deficit = max(0, min(g.spread_target, placed) - len(counts))
            bounds.append(unlabeled + max(excess, deficit))
        else:
            bounds.append(state.penalty(i))
    members = [set(state.groups[i].members) for i in broken]
    disjoint = sum(len(m) for m in members) == len(set().union(*members)) if members else True
    return sum(bounds) if disjoint else max(bounds, default=0)


def _best_single(
    state: _State, keys: Iterable[str], weight: Callable[[int], int], guard: Sequence[int]
) -> tuple[int, str, str] | None:
    """The single move that lowers the weighted penalty most without making any group
    in `guard` worse: (gain, vm, target), or None when no move gains."""
    best: tuple[int, str, str] | None = None
    guarded = set(guard)
    for key in keys:
        groups = state.of_vm.get(key, ())
        if not groups:
            continue
        vm = state.vms[key]
        before = {i: state.penalty(i) for i in groups}
        # No move of this VM gains more than clearing all its groups' penalties: once a
        # target does, later ones cannot win (the first best target is kept anyway).
        cap = sum(weight(i) * before[i] for i in groups)
        if cap <= 0 or (best is not None and best[0] >= cap):
            continue
        source = state.where[key]
        for host in state.targets(key):
            if not state.fits(host, vm):
                continue
            state.move(key, host)
            after = {i: state.penalty(i) for i in groups}
            state.move(key, source)
            if any(after[i] > before[i] for i in groups if i in guarded):
                continue
            gain = sum(weight(i) * (before[i] - after[i]) for i in groups)
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, key, host)
                if gain >= cap:
                    break
    return best


def _greedy(
    state: _State, limit: int, weight: Callable[[int], int], guard: Sequence[int], why: str
) -> list[Move]:
    moves: list[Move] = []
    while len(moves) < limit:
        broken = [i for i in range(len(state.groups)) if weight(i) and state.penalty(i)]
        degraded = state.snapshot.degraded
        keys = sorted(
            {m for i in broken for m in state.groups[i].members if m in state.where}
            & set(state.movable),
            key=lambda k: (k not in degraded, k),  # on a tie, move a degraded VM
        )
        found = _best_single(state, keys, weight, guard)
        if found is None:
            break
        _gain, key, host = found
        moves.append(Move(vm=key, source=state.where[key], target=host, why=why))
        state.move(key, host)
    return moves


def _explain(state: _State, keys: Iterable[str], moves: Sequence[Move], what: str) -> list[Move]:
    """Each move with the groups it is about, in words."""
    out = []
    for m in moves:
        titles = [
            state.groups[i].title for i in state.of_vm.get(m.vm, ()) if state.groups[i].key in keys
        ]
        out.append(Move(m.vm, m.source, m.target, f"{what}: {', '.join(titles) or 'room'}"))
    return out


def _ordered(state: _State, moves: Sequence[Move]) -> list[Move]:
    """An order in which each move finds room on its target when it runs (cold moves
    free their source at once); a cycle keeps the remaining moves as they are."""
    left = list(moves)
    out: list[Move] = []
    free = {h: list(f) for h, f in state.free.items()}
    while left:
        for m in left:
            r = state.vms[m.vm].resources
            f = free[m.target]
            if f[0] >= r.vcpus and f[1] >= r.memory_mib and f[2] >= r.disk_gib:
                break
        else:
            out.extend(left)
            break
        left.remove(m)
        out.append(m)
        for h, sign in ((m.source, 1), (m.target, -1)):
            if h in free:
                free[h][0] += sign * r.vcpus
                free[h][1] += sign * r.memory_mib
                free[h][2] += sign * r.disk_gib
    return out


def _work(
    snapshot: Snapshot,
    groups: Sequence[ConstraintGroup],
    improve: bool,
    only: frozenset[str] | None,
) -> bool:
    """Whether a plan could hold a move: a required group to repair is broken, or
    preferred groups may be improved. O(members): the leader's loop asks this at every
    wake-up, and the search's state costs a pass over every VM and host."""
    if improve and any(not g.required for g in groups):
        return True
    hosts = snapshot.hosts
    for g in groups:
        if not g.required or (only is not None and g.key not in only):
            continue
        key = g.topology_key

        def domain(host: str, key: str = key) -> str | None:
            return host_domain(hosts, host, key)

        if group_penalty(g, snapshot.placements, domain):
            return True
    return False


def plan_rebalance(
    snapshot: Snapshot,
    max_moves: int = 0,
    *,
    improve: bool = True,
    exact_budget: int = EXACT_BUDGET,
    only: frozenset[str] | None = None,
) -> RebalancePlan:
    """Moves that repair every broken required group with as few moves as possible, then
    (with `improve`) single moves that improve preferred groups. `max_moves` > 0 caps
    the plan (repairs first); what the cap leaves out is counted in `truncated`. `only`
    names the required groups to repair (a rule or label change: the groups it breaks);
    the others are then only kept from getting worse."""
    groups = compile_groups(
        snapshot.vms,
        snapshot.rules.values(),
        snapshot.policies.values(),
        scope_vms=snapshot.scope_vms,
    )
    if not _work(snapshot, groups, improve, only):
        return RebalancePlan()
    state = _State(snapshot, groups)
    required = _required(state)
    focus = {i for i in required if only is None or groups[i].key in only}
    broken_before = [i for i in focus if state.penalty(i)]
    broken_keys = {groups[i].key for i in broken_before}
    # Greedy first (single moves lowering the summed penalty of the groups to repair,
    # never making a required group worse): when it repairs everything with as many
    # moves as the lower bound, nothing fewer exists and the exact search is spared.
    greedy = _greedy(state, 10_000, lambda i: 1 if i in focus else 0, required, "repair")
    greedy_done = not any(state.penalty(i) for i in focus)
    for m in reversed(greedy):
        state.move(m.vm, m.source)
    repairs: list[Move] | None
    if greedy_done and len(greedy) <= _lower_bound(state, broken_before):
        repairs, minimal = greedy, True
    else:
        repairs = _exact(state, exact_budget, focus)
        minimal = repairs is not None
        if repairs is None:
            repairs = greedy
    repairs = _ordered(state, _explain(state, broken_keys, repairs, "repair"))
    for m in repairs:
        state.move(m.vm, m.target)
    unrepaired: dict[str, str] = {}
    for i in sorted(focus):
        if state.penalty(i):
            g = groups[i]
            where = {k: (h,) for k, h in state.where.items()}
            unrepaired[g.key] = "; ".join(group_violations(g, where, snapshot.hosts))
    improvements: list[Move] = []
    improved: set[str] = set()
    if improve:
        preferred = [i for i, g in enumerate(groups) if not g.required]
        weights = {i: max(1, groups[i].weight) for i in preferred}
        room = (max_moves - len(repairs)) if max_moves > 0 else 10_000
        if room > 0 and preferred:
            before = {i: state.penalty(i) for i in preferred}
            found = _greedy(state, room, lambda i: weights.get(i, 0), required, "improve")
            improved = {groups[i].key for i in preferred if state.penalty(i) < before[i]}
            for m in reversed(found):
                state.move(m.vm, m.source)
            improvements = _ordered(state, _explain(state, improved, found, "improve"))
    moves = [*repairs, *improvements]
    truncated = 0
    if max_moves > 0 and len(moves) > max_moves:
        truncated = len(moves) - max_moves
        moves = moves[:max_moves]
    return RebalancePlan(
        moves=tuple(moves),
        repair_moves=min(len(repairs), len(moves)),
        minimal=minimal,
        broken=tuple(sorted(broken_keys)),
        unrepaired=dict(sorted(unrepaired.items())),
        improved=tuple(sorted(improved)),
        truncated=truncated,
    )


def moved_snapshot(snapshot: Snapshot, moves: Iterable[Move]) -> Snapshot:
    """The snapshot with `moves` applied (for checks and tests)."""
    placements = dict(snapshot.placements)
    for m in moves:
        placements[m.vm] = m.target
    return dataclasses.replace(snapshot, placements=placements)
