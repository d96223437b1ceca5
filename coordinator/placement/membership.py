"""Who joins which rule, checked where VMs are created (pure): a VM is in at most one rule
of each kind per scope (vCD, Abiquo), a rule's `max_members` caps how many it holds
(Exoscale caps a group at 8), and a required affinity rule's members placed in one batch
are placed all or none (vCD's mandatory rule fails the deployment unless it can be met).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from hvplace.coordinator.placement import reasons
from hvplace.proto.errors import Conflict, InvalidInput
from hvplace.proto.records import VM, Explanation, ReasonCount, Rule, RuleKind

if TYPE_CHECKING:
    from hvplace.coordinator.placement.engine import Plan
    from hvplace.coordinator.snapshot import Snapshot


def _names(keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    named = ", ".join(f"`{k}`" for k in keys[:limit])
    return named + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def rules_of(vm: VM, rules: Iterable[Rule]) -> list[Rule]:
    return sorted((r for r in rules if r.selects(vm)), key=lambda r: r.key)


def _by_scope(rules: Iterable[Rule]) -> dict[str, list[Rule]]:
    """Rules per scope: a VM joins only rules of its own scope."""
    found: dict[str, list[Rule]] = {}
    for rule in rules:
        found.setdefault(rule.scope, []).append(rule)
    return found


def check_polarity(vms: Iterable[VM], rules: Iterable[Rule]) -> None:
    """Conflict when a VM (new, or with new labels) would join two rules of one kind."""
    scoped = _by_scope(rules)
    for vm in vms:
        by_kind: dict[RuleKind, list[str]] = {}
        for rule in rules_of(vm, scoped.get(vm.scope, ())):
            by_kind.setdefault(rule.kind, []).append(rule.name)
        for kind, names in sorted(by_kind.items()):
            if len(names) > 1:
                raise Conflict(
                    f"VM {vm.key} would join {kind.value} rules {_names(names)}; a VM may be"
                    f" in at most one {kind.value} rule per scope: change its labels or the"
                    " rules' selectors"
                )


def member_count(rule: Rule, snapshot: Snapshot) -> int:
    """Named members (created or not) and the scope's VMs the selector picks."""
    names = set(rule.members)
    if rule.selector is not None and not rule.selector.is_empty():
        selector = rule.selector
        names.update(
            vm.name
            for vm in snapshot.scope_vms((rule.scope,))[rule.scope]
            if selector.matches(vm.labels)
        )
    return len(names)


def check_max_members(snapshot: Snapshot, rules: Iterable[Rule], new: Sequence[VM]) -> None:
    """InvalidInput (`incorrect`) when a rule would hold more than its `max_members`
    with `new` (created or relabelled VMs, laid over `snapshot` by the caller)."""
    capped = [r for r in rules if r.max_members]
    if not capped:
        return
    scoped = _by_scope(capped)
    touched = {r.key for vm in new for r in rules_of(vm, scoped.get(vm.scope, ()))}
    for rule in sorted(capped, key=lambda r: r.key):
        if rule.key not in touched:
            continue
        count = member_count(rule, snapshot)
        if count > rule.max_members:
            joining = [vm.key for vm in new if rule.selects(vm)]
            raise InvalidInput(
                f"rule `{rule.key}` holds at most {rule.max_members} members (max_members);"
                f" with {_names(joining)} it would hold {count}"
            )


def check_rule_members(rule: Rule, snapshot: Snapshot) -> None:
    """InvalidInput when a created or changed rule already selects more than its cap."""
    if rule.max_members:
        count = member_count(rule, snapshot)
        if count > rule.max_members:
            raise InvalidInput(
                f"rule `{rule.key}` would hold {count} members; its max_members is"
                f" {rule.max_members}"
            )


def hold_split_affinity(plan: Plan, batch: Sequence[VM], rules: Iterable[Rule]) -> Plan:
    """A required affinity rule's members in one batch are placed all or none: when one
    of them stays pending, the others placed with it are held back too."""
    if not plan.pending:
        return plan
    # Only a rule of a scope with a VM left pending can hold anything back.
    stuck = {key.split("/", 1)[0] for key in plan.pending}
    required = [r for r in rules if r.scope in stuck and r.kind is RuleKind.AFFINITY and r.required]
    if not required:
        return plan
    by_scope: dict[str, list[VM]] = {}
    for vm in batch:
        by_scope.setdefault(vm.scope, []).append(vm)
    assignments = dict(plan.assignments)
    pending = dict(plan.pending)
    for rule in sorted(required, key=lambda r: r.key):
        members = [vm.key for vm in by_scope.get(rule.scope, ()) if rule.selects(vm)]
        left = [k for k in members if k in pending]
        if not left or len(members) < 2:
            continue
        held = ReasonCount(
            code=reasons.ATOMIC_BATCH,
            message=(
                f"held back: required affinity rule `{rule.name}` places its members of one"
                f" request all or none, and {_names(left)} cannot be placed"
            ),
            hosts=0,
            rule=rule.key,
        )
        for key in members:
            if key in assignments:
                del assignments[key]
                pending[key] = Explanation(vm=key, total_hosts=0, feasible_hosts=0, reasons=(held,))
    return dataclasses.replace(plan, assignments=assignments, pending=pending)
