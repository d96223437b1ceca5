"""The rule API calls: create, read, list, update and delete placement rules, and each
scope's policy; every change validated against the cluster and failover admission."""

from __future__ import annotations

import dataclasses
import time

from hvplace.coordinator.admission import AdmissionCheck, AdmissionReport, join_keys
from hvplace.coordinator.operations.backend import Backend, ClusterView
from hvplace.coordinator.operations.noun import Noun, fingerprint, replay
from hvplace.coordinator.operations.results import RuleMember, RuleResult, RuleView
from hvplace.coordinator.operations.vms import vm_phase
from hvplace.coordinator.placement import (
    membership,
    rule_compliance,
    validate_policy_change,
    validate_rule_change,
)
from hvplace.coordinator.rebalance import Rebalancing, newly_broken
from hvplace.coordinator.store import Txn
from hvplace.proto import codec, keyspace, validation
from hvplace.proto.errors import Conflict, NotFound
from hvplace.proto.names import check_name
from hvplace.proto.records import RequestRecord, Rule, ScopePolicy


def rule_view(view: ClusterView, rule: Rule) -> RuleView:
    """A rule with its members (also those named and not created yet) and compliance."""
    members = []
    named = set(rule.members)
    for key in sorted(view.vms):
        vm = view.vms[key]
        if not rule.selects(vm):
            continue
        named.discard(vm.name)
        host = view.snapshot.placements.get(key, "")
        domain = ""
        if host and host in view.snapshot.hosts:
            domain = view.snapshot.hosts[host].topology(rule.topology_key) or ""
        members.append(
            RuleMember(
                name=vm.name, host=host, domain=domain, phase=vm_phase(view, key).phase.value
            )
        )
    # Named members not created yet are listed so the operator sees the whole rule.
    members.extend(RuleMember(name=n, phase="absent") for n in sorted(named))
    snapshot = view.snapshot
    if rule.key not in snapshot.rules:
        snapshot = dataclasses.replace(snapshot, rules={**snapshot.rules, rule.key: rule})
    compliance = rule_compliance(snapshot).get(rule.key)
    return RuleView(
        rule=rule,
        members=tuple(members),
        satisfied=compliance.satisfied if compliance else True,
        violations=compliance.violations if compliance else (),
    )


def _find(view: ClusterView, scope: str, name: str) -> Rule:
    check_name(scope, "scope")
    check_name(name, "rule name")
    rule = view.rules.get(f"{scope}/{name}")
    if rule is None:
        raise NotFound(f"rule {scope}/{name} does not exist")
    return rule


class Rules(Noun):
    def __init__(self, backend: Backend, rebalancing: Rebalancing) -> None:
        super().__init__(backend)
        self.rebalancing = rebalancing

    async def _make_hold(self, rule: Rule, old: Rule | None = None) -> None:
        """`--rebalance`: move VMs until `rule` holds (every other check first, on the
        rules alone); the change itself is then validated and committed as usual."""
        view = await self.backend.fresh_view()
        unplaced = dataclasses.replace(view.snapshot, placements={}, reservations={})
        validate_rule_change(unplaced, rule, old=old)
        membership.check_rule_members(rule, view.snapshot)
        others = {k: r for k, r in view.snapshot.rules.items() if old is None or k != old.key}
        changed = dataclasses.replace(view.snapshot, rules={**others, rule.key: rule})
        broken = newly_broken(view.snapshot, changed) | (
            frozenset({rule.key}) if old is not None else frozenset()
        )
        if rule.required:
            await self.rebalancing.make_hold(changed, f"rule {rule.key}", broken)

    async def create(self, request_id: str, rule: Rule, rebalance: bool) -> RuleResult:
        validation.validate_rule(rule)
        if request_id:
            check_name(request_id, "request id")
        self.require_leader()
        digest = fingerprint("create_rule", codec.to_dict(rule))
        key = keyspace.rule(rule.scope, rule.name)
        if rebalance and rule.key not in (await self.backend.fresh_view()).rules:
            await self._make_hold(dataclasses.replace(rule, created_at=time.time()))

        async def create(txn: Txn) -> tuple[Rule, AdmissionReport] | None:
            if request_id and await replay(txn, request_id, "create_rule", digest):
                return None
            if await txn.get(key) is not None:
                raise Conflict(f"rule {rule.key} already exists; update it or delete it first")
            view = await self.backend.fresh_view()
            new = dataclasses.replace(rule, created_at=time.time())
            validate_rule_change(view.snapshot, new)
            membership.check_rule_members(new, view.snapshot)
            report = AdmissionCheck.of(view.config).run(view.snapshot, extra_rules=[new])
            txn.put(key, codec.dumps(new))
            if request_id:
                record = RequestRecord(
                    request_id=request_id,
                    kind="create_rule",
                    targets=(rule.key,),
                    fingerprint=digest,
                    created_at=new.created_at,
                )
                txn.put(keyspace.request(request_id), codec.dumps(record))
            return new, report

        created = await self.backend.update(create, subject=f"rule {rule.key}")
        if created is None:  # a retried request, answered from what it created
            view = await self.backend.fresh_view()
            stored = _find(view, rule.scope, rule.name)
            return RuleResult(rule=rule_view(view, stored), admission=AdmissionReport(ok=True))
        new, report = created
        return RuleResult(rule=rule_view(self.backend.view(), new), admission=report)

    async def get(self, scope: str, name: str) -> RuleView:
        view = self.backend.view()
        return rule_view(view, _find(view, scope, name))

    async def list(self, scope: str = "") -> list[RuleView]:
        if scope:
            check_name(scope, "scope")
        view = self.backend.view()
        return [
            rule_view(view, view.rules[k])
            for k in sorted(view.rules)
            if not scope or view.rules[k].scope == scope
        ]

    async def update(self, rule: Rule, rebalance: bool) -> RuleResult:
        validation.validate_rule(rule)
        self.require_leader()
        key = keyspace.rule(rule.scope, rule.name)
        if rebalance:
            old = (await self.backend.fresh_view()).rules.get(rule.key)
            if old is None:
                raise NotFound(f"rule {rule.key} does not exist")
            await self._make_hold(dataclasses.replace(rule, created_at=old.created_at), old)

        async def change(txn: Txn) -> tuple[Rule, AdmissionReport]:
            raw = await txn.get(key)
            if raw is None:
                raise NotFound(f"rule {rule.key} does not exist")
            old = codec.loads(Rule, raw)
            new = dataclasses.replace(rule, created_at=old.created_at)
            view = await self.backend.fresh_view()
            validate_rule_change(view.snapshot, new, old=old)
            membership.check_rule_members(new, view.snapshot)
            others = {k: r for k, r in view.snapshot.rules.items() if k != new.key}
            snapshot = dataclasses.replace(view.snapshot, rules=others)
            report = AdmissionCheck.of(view.config).run(snapshot, extra_rules=[new])
            txn.put(key, codec.dumps(new))
            return new, report

        new, report = await self.backend.update(change, subject=f"rule {rule.key}")
        return RuleResult(rule=rule_view(self.backend.view(), new), admission=report)

    async def delete(self, scope: str, name: str, force: bool) -> None:
        check_name(scope, "scope")
        check_name(name, "rule name")
        self.require_leader()
        key = keyspace.rule(scope, name)

        async def remove(txn: Txn) -> None:
            raw = await txn.get(key)
            if raw is None:
                raise NotFound(f"rule {scope}/{name} does not exist")
            rule = codec.loads(Rule, raw)
            view = await self.backend.fresh_view()
            members = sorted(vm.name for vm in view.vms.values() if rule.selects(vm))
            if members and not force:
                raise Conflict(
                    f"rule {rule.key} still has {len(members)} member(s): {join_keys(members)};"
                    " delete them first or force the deletion"
                )
            txn.delete(key)

        await self.backend.update(remove, subject=f"rule {scope}/{name}")

    async def set_policy(self, policy: ScopePolicy, rebalance: bool = False) -> ScopePolicy:
        validation.validate_policy(policy)
        self.require_leader()
        key = keyspace.policy(policy.scope)
        if rebalance:
            view = await self.backend.fresh_view()
            changed = dataclasses.replace(
                view.snapshot, policies={**view.snapshot.policies, policy.scope: policy}
            )
            broken = newly_broken(view.snapshot, changed)
            await self.rebalancing.make_hold(changed, f"scope `{policy.scope}` policy", broken)

        async def change(txn: Txn) -> None:
            await txn.get(key)  # compared: a concurrent change makes this one re-check
            view = await self.backend.fresh_view()
            validate_policy_change(view.snapshot, policy)
            snapshot = dataclasses.replace(
                view.snapshot, policies={**view.snapshot.policies, policy.scope: policy}
            )
            AdmissionCheck.of(view.config).run(snapshot)
            txn.put(key, codec.dumps(policy))

        await self.backend.update(change, subject=f"scope {policy.scope} policy")
        return policy

    async def get_policy(self, scope: str) -> ScopePolicy:
        check_name(scope, "scope")
        return self.backend.view().policies.get(scope, ScopePolicy(scope=scope))
