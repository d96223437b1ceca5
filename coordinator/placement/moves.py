"""Where a placed VM may move (live migration, drain, rebalance), pure: the engine's filters
and scores with the VM counted nowhere but its reservations, its own host left out.

An explicit target is checked under the same filters and refused with the first reason
that rejects it, so `--to` can never break a rule the engine would keep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hvplace.coordinator.placement import filters, reasons
from hvplace.coordinator.placement.engine import _split_groups, explanation_at, search
from hvplace.coordinator.placement.groups import compile_groups
from hvplace.coordinator.placement.index import ClusterIndex
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.records import VM, Explanation, HostState, ReasonCount

CURRENT_HOST = "current_host"
"""Reason code of the host a VM runs on, in a move's explanation."""


@dataclass(frozen=True, slots=True)
class MoveTarget:
    """The engine's answer for one VM: a host, or None with why (`refusal` names the
    reason an explicit target was refused; `explanation` covers every host)."""

    vm: str
    source: str
    host: str | None
    explanation: Explanation
    refusal: str = ""


def _index(snapshot: Snapshot, key: str) -> ClusterIndex:
    vm = snapshot.vms[key]
    groups = compile_groups(snapshot.vms, snapshot.rules.values(), snapshot.policies.values(), [vm])
    # The VM leaves its host: counted nowhere while a target is chosen. Other VMs'
    # reservations (migrations in flight) count on their targets as if they ran there.
    return ClusterIndex(snapshot, snapshot.vms, groups, uncounted=(key,))


def choose_target(snapshot: Snapshot, key: str, to: str = "") -> MoveTarget:
    """A target for the placed VM `key` under every required rule, or None and why.
    `to` names the host wanted (checked, never forced)."""
    vm = snapshot.vms[key]
    source = snapshot.placements.get(key, "")
    index = _index(snapshot, key)
    src = index.position.get(source)
    explanation = _without_source(explanation_at(index, vm), index, vm, src)
    if to:
        pos = index.position.get(to)
        if pos is None:
            why = f"host {to} is not registered"
        elif pos == src:
            why = f"{key} already runs on {to}"
        else:
            code_msg = _host_rejection(index, vm, pos)
            why = "" if code_msg is None else code_msg[1]
        if why:
            return MoveTarget(key, source, None, explanation, refusal=f"{to}: {why}")
        return MoveTarget(key, source, to, explanation)
    if src is not None:
        # The VM's own host is no target: taken out of the search as a draining host is.
        was = index.ready[src], index.state[src]
        index.ready[src], index.state[src] = False, HostState.DRAINING
        try:
            pos = search(index, vm)
        finally:
            index.ready[src], index.state[src] = was
    else:
        pos = search(index, vm)
    return MoveTarget(key, source, None if pos is None else index.names[pos], explanation)


def _host_rejection(index: ClusterIndex, vm: VM, pos: int) -> tuple[str, str] | None:
    """The first filter of the chain (filters.CHAIN) that rejects the host at `pos`:
    (code, message)."""
    required, _preferred = _split_groups(index, vm, frozenset())
    rejected = filters.first_rejection(index, pos, filters.ask(index, vm, required))
    if rejected is None:
        return None
    code, group = rejected
    free = {
        reasons.INSUFFICIENT_MEMORY: index.free_mem[pos],
        reasons.INSUFFICIENT_CPU: index.free_cpu[pos],
        reasons.INSUFFICIENT_DISK: index.free_disk[pos],
    }.get(code, 0)
    return code, filters.message(code, group, vm, free)


def _without_source(
    explanation: Explanation, index: ClusterIndex, vm: VM, src: int | None
) -> Explanation:
    """The explanation with the VM's own host out of the feasible count, named apart."""
    if src is None or _host_rejection(index, vm, src) is not None:
        return explanation
    own = ReasonCount(
        code=CURRENT_HOST, message=f"the host it runs on ({index.names[src]})", hosts=1
    )
    return dataclasses.replace(
        explanation,
        feasible_hosts=explanation.feasible_hosts - 1,
        reasons=(*explanation.reasons, own),
    )
