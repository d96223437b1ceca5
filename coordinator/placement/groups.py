"""Rules and scope policies compiled into constraint groups: members, kind, topology, bounds.

Every seed behaviour (SPEC §2) is one of these: a Rule is one group; a ScopePolicy with
label anti-affinity is one host-level anti-affinity group per shared label pair.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from hvplace.coordinator.placement import reasons
from hvplace.proto.records import TOPOLOGY_HOST, VM, Host, OnFailure, Rule, RuleKind, ScopePolicy

UNLIMITED = 1 << 30
"""max_per_domain of a spread policy: any number of members may share a host."""


@dataclass(frozen=True, slots=True, eq=False)
class ConstraintGroup:
    """One rule (or one label pair of a scope policy) over its resolved members. What a
    batch counts of it (members per domain) lives in the batch's index (BatchGroup)."""

    key: str
    title: str
    kind: RuleKind
    required: bool
    weight: int
    topology_key: str
    max_per_domain: int
    spread_target: int
    on_failure: OnFailure
    policy: bool
    members: tuple[str, ...]

    @property
    def anti(self) -> bool:
        return self.kind is RuleKind.ANTI_AFFINITY

    def domain_word(self) -> str:
        return "host" if self.topology_key == TOPOLOGY_HOST else self.topology_key

    def rejection_code(self) -> str:
        if self.kind is RuleKind.AFFINITY:
            return reasons.AFFINITY
        return reasons.LABEL_ANTI_AFFINITY if self.policy else reasons.ANTI_AFFINITY

    def bound_text(self) -> str:
        """What the group demands, for messages: "max 1 per host", "at least 2 racks"..."""
        word = self.domain_word()
        if self.kind is RuleKind.AFFINITY:
            return f"all members in one {word}"
        parts = []
        if self.max_per_domain < UNLIMITED:
            parts.append(f"max {self.max_per_domain} per {word}")
        if self.spread_target:
            parts.append(
                f"spread over {self.spread_target} {word}s before any {word} takes a second"
            )
        return ", ".join(parts)


def policy_group_key(scope: str, label: str, value: str) -> str:
    return f"{scope}/label:{label}={value}"


def rule_group(rule: Rule, members: list[str]) -> ConstraintGroup:
    anti = rule.kind is RuleKind.ANTI_AFFINITY
    kind_word = "anti-affinity" if anti else "affinity"
    if not rule.required:
        kind_word = f"preferred {kind_word}"
    spread = min(rule.min_domains, len(members)) if anti and rule.min_domains > 1 else 0
    return ConstraintGroup(
        key=rule.key,
        title=f"{kind_word} rule `{rule.name}`",
        kind=rule.kind,
        required=rule.required,
        weight=rule.weight,
        topology_key=rule.topology_key,
        max_per_domain=rule.max_per_domain if anti else UNLIMITED,
        spread_target=spread,
        on_failure=rule.on_failure,
        policy=False,
        members=tuple(sorted(members)),
    )


def policy_groups(policy: ScopePolicy, scope_vms: list[VM]) -> list[ConstraintGroup]:
    if not policy.label_anti_affinity:
        return []
    by_pair: dict[tuple[str, str], list[str]] = defaultdict(list)
    keys = set(policy.label_keys)
    for vm in scope_vms:
        for label, value in vm.labels.items():
            if not keys or label in keys:
                by_pair[(label, value)].append(vm.key)
    groups = []
    for (label, value), members in sorted(by_pair.items()):
        if len(members) < 2:
            continue  # a lone VM shares its label with nobody: no constraint
        spread = min(policy.spread, len(members)) if policy.spread > 0 else 0
        groups.append(
            ConstraintGroup(
                key=policy_group_key(policy.scope, label, value),
                title=f"label anti-affinity `{label}={value}` in scope `{policy.scope}`",
                kind=RuleKind.ANTI_AFFINITY,
                required=True,
                weight=0,
                topology_key=TOPOLOGY_HOST,
                # With a spread, G8 lets members share hosts once enough hosts hold one.
                max_per_domain=UNLIMITED if policy.spread > 0 else 1,
                spread_target=spread if spread > 1 else 0,
                on_failure=OnFailure.BLOCK,
                policy=True,
                members=tuple(sorted(members)),
            )
        )
    return groups


def _selected(rule: Rule, scope_vms: list[VM], by_name: Mapping[str, VM]) -> list[str]:
    chosen: set[str] = set()
    for name in rule.members:
        vm = by_name.get(name)
        if vm is not None:
            chosen.add(vm.key)
    if rule.selector is not None and not rule.selector.is_empty():
        for vm in scope_vms:
            if rule.selector.matches(vm.labels):
                chosen.add(vm.key)
    return sorted(chosen)


def compile_groups(
    vms: Mapping[str, VM],
    rules: Iterable[Rule],
    policies: Iterable[ScopePolicy],
    focus: Iterable[VM] | None = None,
    scope_vms: Callable[[Iterable[str]], Mapping[str, list[VM]]] | None = None,
    focus_keys: AbstractSet[str] | None = None,
) -> list[ConstraintGroup]:
    """Groups sorted by key. With `focus`, only groups that contain one of those VMs
    (the batch): the others cannot constrain it and cost nothing to skip. Only the
    scopes that hold a rule or a policy are read; `scope_vms` gives a scope's VMs
    (a snapshot's per-scope index) instead of a pass over every VM. `focus_keys` are
    the focus' keys when the caller has them."""
    if focus is not None:
        # One pass over the rules, keeping those of the focus' scopes only.
        focus_list = list(focus)
        if focus_keys is None:
            focus_keys = {vm.key for vm in focus_list}
        scopes = {vm.scope for vm in focus_list}
        rules = [r for r in rules if r.scope in scopes]
        policies = [p for p in policies if p.label_anti_affinity and p.scope in scopes]
    else:
        focus_keys = None
        rules = list(rules)
        policies = [p for p in policies if p.label_anti_affinity]
    wanted = {r.scope for r in rules} | {p.scope for p in policies}
    if scope_vms is not None:
        by_scope: Mapping[str, list[VM]] = scope_vms(wanted)
    else:
        found: dict[str, list[VM]] = defaultdict(list)
        for vm in vms.values():
            if vm.scope in wanted:
                found[vm.scope].append(vm)
        by_scope = found
    names: dict[str, dict[str, VM]] = {
        scope: {vm.name: vm for vm in scope_vms_} for scope, scope_vms_ in by_scope.items()
    }
    groups: list[ConstraintGroup] = []
    for rule in rules:
        if rule.scope not in wanted:
            continue
        members = _selected(rule, by_scope.get(rule.scope, []), names.get(rule.scope, {}))
        if not members:
            continue
        if focus_keys is not None and focus_keys.isdisjoint(members):
            continue
        groups.append(rule_group(rule, members))
    for policy in policies:
        if policy.scope not in wanted:
            continue
        for group in policy_groups(policy, by_scope.get(policy.scope, [])):
            if focus_keys is None or not focus_keys.isdisjoint(group.members):
                groups.append(group)
    groups.sort(key=lambda g: g.key)
    return groups


def host_domain(hosts: Mapping[str, Host], host: str, topology_key: str) -> str | None:
    """A host's domain; a host the snapshot does not know is its own host-level domain."""
    known = hosts.get(host)
    if known is not None:
        return known.topology(topology_key)
    return host if topology_key == TOPOLOGY_HOST else None


def group_violations(
    group: ConstraintGroup,
    where: Mapping[str, tuple[str, ...]],
    hosts: Mapping[str, Host],
) -> list[str]:
    """How the members' current hosts break the group, in words a person can act on.

    `where` maps a VM key to the hosts it occupies (its placement, plus a reservation).
    """
    word = group.domain_word()
    by_domain: dict[str, list[str]] = defaultdict(list)
    problems: list[str] = []
    placed = 0
    for member in group.members:
        occupied = where.get(member, ())
        if occupied:
            placed += 1
        for host in occupied:
            domain = host_domain(hosts, host, group.topology_key)
            if domain is None:
                problems.append(
                    f"`{member}` runs on host {host}, which has no `{group.topology_key}` label"
                )
            else:
                by_domain[domain].append(f"`{member}`")
    if group.anti:
        for domain, names in sorted(by_domain.items()):
            if len(names) > group.max_per_domain:
                problems.append(
                    f"{', '.join(names)} share {word} {domain} (max {group.max_per_domain}"
                    f" per {word})"
                )
        target = min(group.spread_target, placed)
        if target and len(by_domain) < target:
            spots = "; ".join(f"{d}: {', '.join(n)}" for d, n in sorted(by_domain.items()))
            problems.append(
                f"members cover {len(by_domain)} {word}(s), fewer than {target} ({spots})"
            )
    elif len(by_domain) > 1:
        spots = "; ".join(f"{', '.join(n)} in {word} {d}" for d, n in sorted(by_domain.items()))
        problems.append(f"members are split over {len(by_domain)} {word}s: {spots}")
    return problems


def occupancy(
    placements: Mapping[str, str], reservations: Mapping[str, str]
) -> dict[str, tuple[str, ...]]:
    """VM key → every host it holds (its placement and an in-flight reservation)."""
    where: dict[str, tuple[str, ...]] = {k: (h,) for k, h in placements.items()}
    for key, host in reservations.items():
        prior = where.get(key, ())
        if host not in prior:
            where[key] = (*prior, host)
    return where
