"""Checks of a rule or scope-policy change against the other rules and where VMs run now.

SPEC §2: a VM is in at most one rule of each kind per scope (vCD, Abiquo); required rules
must not contradict each other; a required rule that running VMs already break is refused
(Abiquo: a deployed VM joins a layer only if no other member shares its host).
"""

from __future__ import annotations

from collections.abc import Mapping

from hvplace.coordinator.placement.groups import (
    group_violations,
    occupancy,
    policy_groups,
    rule_group,
)
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.errors import Conflict
from hvplace.proto.records import TOPOLOGY_HOST, VM, Host, Rule, RuleKind, ScopePolicy
from hvplace.proto.validation import validate_policy, validate_rule


def _member_names(rule: Rule, scope_vms: list[VM]) -> set[str]:
    """Named members (even VMs not created yet) and the scope's VMs the selector picks."""
    names = set(rule.members)
    if rule.selector is not None and not rule.selector.is_empty():
        names.update(vm.name for vm in scope_vms if rule.selector.matches(vm.labels))
    return names


def _nested(inner_key: str, outer_key: str, hosts: Mapping[str, Host]) -> bool:
    """True when sharing an `inner_key` domain implies sharing an `outer_key` domain
    (host ⊂ rack, or rack ⊂ zone as the hosts' labels show)."""
    if inner_key in (outer_key, TOPOLOGY_HOST):
        return True
    outer_of: dict[str, set[str | None]] = {}
    for host in hosts.values():
        inner = host.topology(inner_key)
        if inner is not None:
            outer_of.setdefault(inner, set()).add(host.topology(outer_key))
    return bool(outer_of) and all(len(v) == 1 and None not in v for v in outer_of.values())


def _names(names: set[str]) -> str:
    return ", ".join(f"`{n}`" for n in sorted(names))


def validate_rule_change(snapshot: Snapshot, rule: Rule, old: Rule | None = None) -> None:
    """Raise InvalidInput or Conflict with a message a person can act on; None if sound.

    `old` is the rule being replaced by an update (its own overlap does not count).
    """
    validate_rule(rule)
    skip = {rule.key} | ({old.key} if old is not None else set())
    scope_vms = sorted(
        (vm for vm in snapshot.vms.values() if vm.scope == rule.scope), key=lambda v: v.key
    )
    mine = _member_names(rule, scope_vms)
    others = sorted(
        (r for r in snapshot.rules.values() if r.scope == rule.scope and r.key not in skip),
        key=lambda r: r.key,
    )
    for other in others:
        shared = mine & _member_names(other, scope_vms)
        if other.kind is rule.kind and shared:
            raise Conflict(
                f"VM(s) {_names(shared)} already in {other.kind.value} rule `{other.name}`;"
                f" a VM may be in at most one {rule.kind.value} rule per scope: remove them"
                f" from `{other.name}` first"
            )
        if other.kind is not rule.kind and rule.required and other.required:
            affinity, anti = (rule, other) if rule.kind is RuleKind.AFFINITY else (other, rule)
            if len(shared) > anti.max_per_domain and _nested(
                affinity.topology_key, anti.topology_key, snapshot.hosts
            ):
                raise Conflict(
                    f"required affinity rule `{affinity.name}` ({affinity.topology_key}) and"
                    f" required anti-affinity rule `{anti.name}` (max {anti.max_per_domain}"
                    f" per {anti.topology_key}) contradict each other over {_names(shared)}"
                )
    if rule.required:
        by_name = {vm.name: vm for vm in scope_vms}
        members = sorted(by_name[n].key for n in mine if n in by_name)
        group = rule_group(rule, members)
        where = occupancy(snapshot.placements, snapshot.reservations)
        problems = group_violations(group, where, snapshot.hosts)
        if problems:
            raise Conflict(
                f"rule `{rule.name}` is already broken by running VMs: {'; '.join(problems)};"
                " move them first, or ask for a rebalance"
            )


def validate_policy_change(snapshot: Snapshot, policy: ScopePolicy) -> None:
    """Refuse a scope policy that the scope's running VMs already break."""
    validate_policy(policy)
    scope_vms = sorted(
        (vm for vm in snapshot.vms.values() if vm.scope == policy.scope), key=lambda v: v.key
    )
    where = occupancy(snapshot.placements, snapshot.reservations)
    problems: list[str] = []
    for group in policy_groups(policy, scope_vms):
        problems.extend(
            f"{group.title}: {p}" for p in group_violations(group, where, snapshot.hosts)
        )
    if problems:
        raise Conflict(
            f"scope `{policy.scope}` policy is already broken by running VMs: {'; '.join(problems)};"
            " move them first, or ask for a rebalance"
        )
