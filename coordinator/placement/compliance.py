"""Whether each rule and scope-policy group holds where VMs run now (compliance gauges)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hvplace.coordinator.placement.groups import compile_groups, group_violations, occupancy
from hvplace.coordinator.snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class RuleCompliance:
    key: str
    satisfied: bool
    violations: tuple[str, ...] = ()
    required: bool = True
    degraded: tuple[str, ...] = ()
    """VM keys that knowingly break this rule (placed under on_failure=degrade)."""


def rule_compliance(snapshot: Snapshot) -> Mapping[str, RuleCompliance]:
    """Rule key (and policy group key, `scope/label:k=v`) → compliance, sorted by key.

    Only placements count: a reservation is a move in flight, not where a VM runs.
    """
    groups = compile_groups(
        snapshot.vms,
        snapshot.rules.values(),
        snapshot.policies.values(),
        scope_vms=snapshot.scope_vms,
    )
    # Only the members' hosts are read: O(members), not a map of every VM.
    members = {m for g in groups for m in g.members}
    where = occupancy({k: h for k in members if (h := snapshot.placements.get(k))}, {})
    degraded_by_rule: dict[str, list[str]] = {}
    for vm_key, rule_keys in sorted(snapshot.degraded.items()):
        for rule_key in rule_keys:
            degraded_by_rule.setdefault(rule_key, []).append(vm_key)
    result: dict[str, RuleCompliance] = {}
    for rule in snapshot.rules.values():
        # A rule with no member yet is trivially satisfied; compile skips it.
        result[rule.key] = RuleCompliance(
            key=rule.key,
            satisfied=True,
            required=rule.required,
            degraded=tuple(degraded_by_rule.get(rule.key, ())),
        )
    for group in groups:
        problems = tuple(group_violations(group, where, snapshot.hosts))
        result[group.key] = RuleCompliance(
            key=group.key,
            satisfied=not problems,
            violations=problems,
            required=group.required,
            degraded=tuple(degraded_by_rule.get(group.key, ())),
        )
    return dict(sorted(result.items()))
