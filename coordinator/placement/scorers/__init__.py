"""Scorers: rank the hosts that passed every filter; the highest total wins, ties by name.

Preferences (preferred rules and preferred node-affinity terms, weights 1–100) dominate:
they are scaled by PREFERENCE_SCALE so that the capacity score (0–100, least allocated,
which spreads load) only decides between hosts the preferences rate equally.
"""

from __future__ import annotations

from collections.abc import Sequence

from hvplace.coordinator.placement.index import BatchGroup, ClusterIndex
from hvplace.proto.records import Resources
from hvplace.proto.selectors import NodeAffinity

PREFERENCE_SCALE = 1000


def preferred_rules(pos: int, preferred: Sequence[BatchGroup]) -> int:
    """+weight for a preferred affinity met, −weight for a preferred anti-affinity broken."""
    total = 0
    for group in preferred:
        domain = group.domain_of[pos]
        if domain is None:
            continue
        count = group.counts.get(domain, 0)
        if group.anti:
            if count >= group.max_per_domain or (count and group.occupied < group.spread_target):
                total -= group.weight
        elif count:
            total += group.weight
    return total


def least_allocated(index: ClusterIndex, pos: int, need: Resources) -> float:
    """0–100: the share of memory and vCPUs left free after placing, averaged."""
    mem = (index.free_mem[pos] - need.memory_mib) / index.alloc_mem[pos]
    cpu = (index.free_cpu[pos] - need.vcpus) / index.alloc_cpu[pos]
    return 50.0 * (mem + cpu)


def node_terms(index: ClusterIndex, affinity: NodeAffinity) -> list[tuple[int, frozenset[int]]]:
    """The preferred node-affinity terms as (weight, hosts matching), looked up once per
    VM rather than per host scored (a term's hash is not free)."""
    return [(p.weight, index.term_hosts(p.term)) for p in affinity.preferred]


def score(
    index: ClusterIndex,
    pos: int,
    need: Resources,
    terms: Sequence[tuple[int, frozenset[int]]],
    preferred: Sequence[BatchGroup],
) -> float:
    preference = sum(weight for weight, hosts in terms if pos in hosts) if terms else 0
    if preferred:
        preference += preferred_rules(pos, preferred)
    return PREFERENCE_SCALE * preference + least_allocated(index, pos, need)
