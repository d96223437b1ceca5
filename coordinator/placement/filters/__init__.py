"""Filters: each says why a host cannot take a VM (a reason code), or None when it can.

`FILTER_ORDER` is the order explain reports: a host counts once, under the first filter
that rejects it. The state and node-affinity filters come first because they never
change for the VM; rules before capacity because a rule is the sturdier reason (capacity
frees up, a member on the host does not move by itself).
"""

from __future__ import annotations

from collections.abc import Sequence

from hvplace.coordinator.placement import reasons
from hvplace.coordinator.placement.groups import ConstraintGroup
from hvplace.coordinator.placement.index import ClusterIndex
from hvplace.proto.models import HostState, NodeAffinity, Resources

_STATE_CODES = {
    HostState.CORDONED: reasons.HOST_CORDONED,
    HostState.DRAINING: reasons.HOST_DRAINING,
    HostState.DRAINED: reasons.HOST_DRAINING,
    HostState.LOST: reasons.HOST_LOST,
    HostState.DEGRADED: reasons.HOST_DEGRADED,
}

FILTER_ORDER = ("host_state", "node_affinity", "rules", "capacity")


def host_state(index: ClusterIndex, pos: int) -> str | None:
    """Cordoned, draining, lost and degraded hosts (libvirt unusable: a start there
    would fail) take nothing new."""
    if index.ready[pos]:
        return None
    return _STATE_CODES[index.state[pos]]


def node_affinity(index: ClusterIndex, pos: int, affinity: NodeAffinity) -> str | None:
    admitted = index.admitted(affinity)
    return None if admitted is None or pos in admitted else reasons.NODE_AFFINITY


def group_rejection(group: ConstraintGroup, pos: int) -> str | None:
    """One required group against one host: dictionary lookups in the batch's counts."""
    domain = group.domain_of[pos]
    if domain is None:
        return reasons.TOPOLOGY_LABEL_MISSING
    count = group.counts.get(domain, 0)
    if group.anti:
        if count >= group.max_per_domain:
            return group.rejection_code()
        # Balanced spread: no domain takes a second member while too few hold one.
        if count and group.occupied < group.spread_target:
            return reasons.SPREAD
        return None
    if group.occupied and not count:
        return reasons.AFFINITY
    return None


def rules(pos: int, required: Sequence[ConstraintGroup]) -> tuple[str, ConstraintGroup] | None:
    for group in required:
        code = group_rejection(group, pos)
        if code is not None:
            return code, group
    return None


def capacity(index: ClusterIndex, pos: int, need: Resources) -> str | None:
    if index.free_mem[pos] < need.memory_mib:
        return reasons.INSUFFICIENT_MEMORY
    if index.free_cpu[pos] < need.vcpus:
        return reasons.INSUFFICIENT_CPU
    if index.free_disk[pos] < need.disk_gib:
        return reasons.INSUFFICIENT_DISK
    return None


def fits(
    index: ClusterIndex, pos: int, need: Resources, required: Sequence[ConstraintGroup]
) -> bool:
    """The search's hot check; state and node affinity are already in the candidate list
    except for a host a failure simulation just marked lost, hence the `ready` test."""
    if not index.ready[pos] or capacity(index, pos, need) is not None:
        return False
    return all(group_rejection(group, pos) is None for group in required)
