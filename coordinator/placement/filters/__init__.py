"""Filters: each says why a host cannot take a VM (a reason code), or None when it can.

`CHAIN` is the one ordered list of filters, each with its reason codes, its check and
its message: the search (`fits`) and `explain` (`first_rejection`) both walk it, so a
host counts once, under the first filter that rejects it, in the order written here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hvplace.coordinator.placement import reasons
from hvplace.coordinator.placement.index import BatchGroup, ClusterIndex
from hvplace.proto.records import VM, HostState, Resources
from hvplace.proto.selectors import LabelExpression, NodeAffinity

STATE_CODES = {
    HostState.CORDONED: reasons.HOST_CORDONED,
    HostState.DRAINING: reasons.HOST_DRAINING,
    HostState.DRAINED: reasons.HOST_DRAINING,
    HostState.LOST: reasons.HOST_LOST,
    HostState.DEGRADED: reasons.HOST_DEGRADED,
}

Rejection = tuple[str, BatchGroup | None]
"""A reason code and, for a rule, the group that rejects."""


@dataclass(frozen=True, slots=True)
class Ask:
    """What one VM asks of every host, worked out once per VM: its resources, the host
    positions its required node affinity admits (None: all) and its required groups."""

    vm: VM
    need: Resources
    admitted: frozenset[int] | None
    required: Sequence[BatchGroup]


def ask(index: ClusterIndex, vm: VM, required: Sequence[BatchGroup]) -> Ask:
    return Ask(vm, vm.resources, index.admitted(vm.node_affinity), required)


# --------------------------------------------------------------------------- checks


def host_state(index: ClusterIndex, pos: int, _ask: Ask) -> Rejection | None:
    """Cordoned, draining, lost and degraded hosts (libvirt unusable: a start there
    would fail) take nothing new."""
    if index.ready[pos]:
        return None
    return STATE_CODES[index.state[pos]], None


def node_affinity(_index: ClusterIndex, pos: int, ask: Ask) -> Rejection | None:
    admitted = ask.admitted
    return None if admitted is None or pos in admitted else (reasons.NODE_AFFINITY, None)


def group_rejection(group: BatchGroup, pos: int) -> str | None:
    """One required group against one host: dictionary lookups in the batch's counts."""
    domain = group.domain_of[pos]
    if domain is None:
        return reasons.TOPOLOGY_LABEL_MISSING
    count = group.counts.get(domain, 0)
    if group.anti:
        if count >= group.max_per_domain:
            return str(group.rejection_code())
        # Balanced spread: no domain takes a second member while too few hold one.
        if count and group.occupied < group.spread_target:
            return reasons.SPREAD
        return None
    if group.occupied and not count:
        return reasons.AFFINITY
    return None


def rules(_index: ClusterIndex, pos: int, ask: Ask) -> Rejection | None:
    for group in ask.required:
        code = group_rejection(group, pos)
        if code is not None:
            return code, group
    return None


def capacity(index: ClusterIndex, pos: int, ask: Ask) -> Rejection | None:
    need = ask.need
    if index.free_mem[pos] < need.memory_mib:
        return reasons.INSUFFICIENT_MEMORY, None
    if index.free_cpu[pos] < need.vcpus:
        return reasons.INSUFFICIENT_CPU, None
    if index.free_disk[pos] < need.disk_gib:
        return reasons.INSUFFICIENT_DISK, None
    return None


# --------------------------------------------------------------------------- messages


def _state_message(code: str, _group: BatchGroup | None, _vm: VM, _free: int) -> str:
    return {
        reasons.HOST_CORDONED: "host cordoned",
        reasons.HOST_DRAINING: "host draining",
        reasons.HOST_LOST: "host lost",
        reasons.HOST_DEGRADED: "host degraded (libvirt unusable)",
    }[code]


def affinity_text(affinity: NodeAffinity) -> str:
    def term(exprs: tuple[LabelExpression, ...]) -> str:
        return " and ".join(str(e) for e in exprs)

    return " or ".join(f"({term(t.match_expressions)})" for t in affinity.required)


def _affinity_message(_code: str, _group: BatchGroup | None, vm: VM, _free: int) -> str:
    return f"node affinity mismatch (requires {affinity_text(vm.node_affinity)})"


def _rule_message(code: str, group: BatchGroup | None, _vm: VM, _free: int) -> str:
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


def _capacity_message(code: str, _group: BatchGroup | None, vm: VM, most_free: int) -> str:
    need = vm.resources
    if code == reasons.INSUFFICIENT_MEMORY:
        return f"insufficient memory (need {need.memory_mib} MiB, free {most_free})"
    if code == reasons.INSUFFICIENT_CPU:
        return f"insufficient cpu (need {need.vcpus} vCPUs, free {most_free})"
    return f"insufficient disk (need {need.disk_gib} GiB, free {most_free})"


# --------------------------------------------------------------------------- the chain


@dataclass(frozen=True, slots=True)
class Filter:
    """One position of the chain: the codes it may return, its check and its message
    (for a code, the rejecting group if any, the VM, the most free of the resource)."""

    name: str
    codes: tuple[str, ...]
    check: Callable[[ClusterIndex, int, Ask], Rejection | None]
    message: Callable[[str, BatchGroup | None, VM, int], str]


CHAIN: tuple[Filter, ...] = (
    # 1. The host's state: it never changes for the VM, and a lost or cordoned host is
    #    the plainest answer (nothing about the VM would make such a host take it).
    Filter(
        "host_state",
        (reasons.HOST_CORDONED, reasons.HOST_DRAINING, reasons.HOST_LOST, reasons.HOST_DEGRADED),
        host_state,
        _state_message,
    ),
    # 2. Node affinity: fixed for the VM as well. The search's candidate lists hold only
    #    admitted hosts already; this check covers the hint and domain pools and explain.
    Filter("node_affinity", (reasons.NODE_AFFINITY,), node_affinity, _affinity_message),
    # 3. Required rules before capacity: a rule is the sturdier reason (capacity frees
    #    up; a member on the host does not move by itself).
    Filter(
        "rules",
        (
            reasons.TOPOLOGY_LABEL_MISSING,
            reasons.ANTI_AFFINITY,
            reasons.LABEL_ANTI_AFFINITY,
            reasons.SPREAD,
            reasons.AFFINITY,
        ),
        rules,
        _rule_message,
    ),
    # 4. Capacity last, memory then CPU then disk: memory is the usual limit, and the
    #    most free amount of the short resource is what the message reports.
    Filter(
        "capacity",
        (reasons.INSUFFICIENT_MEMORY, reasons.INSUFFICIENT_CPU, reasons.INSUFFICIENT_DISK),
        capacity,
        _capacity_message,
    ),
)

BY_CODE: dict[str, Filter] = {code: f for f in CHAIN for code in f.codes}
"""The filter that returns each code (its message)."""

_CHECKS = tuple(f.check for f in CHAIN)


def first_rejection(index: ClusterIndex, pos: int, ask: Ask) -> Rejection | None:
    """The first filter of the chain that rejects the host, or None when all pass."""
    for check in _CHECKS:
        rejected = check(index, pos, ask)
        if rejected is not None:
            return rejected
    return None


def fits(index: ClusterIndex, pos: int, ask: Ask) -> bool:
    """The search's test: the same chain, only whether every filter passes."""
    return first_rejection(index, pos, ask) is None


def message(code: str, group: BatchGroup | None, vm: VM, most_free: int) -> str:
    return BY_CODE[code].message(code, group, vm, most_free)
