"""The business rules of each API call: validate first, check with the engine, then one fenced
etcd transaction through the Backend. gRPC-free; api.py only translates to and from proto."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hvplace.coordinator import phases, whatif
from hvplace.coordinator.images import Catalogue
from hvplace.coordinator.placement import (
    AdmissionResult,
    Plan,
    check_admission,
    explain,
    membership,
    rule_compliance,
    validate_policy_change,
    validate_rule_change,
)
from hvplace.coordinator.rebalance import Mover, Rebalancing, newly_broken, with_degraded
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto import keyspace, models
from hvplace.proto.errors import (
    Busy,
    Conflict,
    HvplaceError,
    InvalidInput,
    NotFound,
    NotLeader,
    Unavailable,
)
from hvplace.proto.models import (
    VM,
    AdmissionPolicy,
    Assignment,
    ClusterConfig,
    DomainStatus,
    Explanation,
    Host,
    HostInfo,
    HostState,
    HostStatus,
    Phase,
    Power,
    ReasonCount,
    RequestRecord,
    Resources,
    Rule,
    ScopePolicy,
    VMStatus,
    host_state,
)
from hvplace.proto.names import check_name, quote

MAX_BATCH = 10_000
"""VMs per create request; larger batches are split by the client."""

START_FAILED = "start_failed"
"""Reason code in `explain` for a VM that failed to start where it was placed."""

ADMISSION_NOTE = (
    "the cluster could not re-place these VMs after that failure with every required rule"
)


# --------------------------------------------------------------------------- backend seam


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The records as the coordinator's cache holds them at one revision, keyed for the
    API: VM-keyed maps use `scope/name`; hosts present in `hosts` hold a lease now."""

    revision: int
    snapshot: Snapshot
    hosts: Mapping[str, HostInfo] = field(default_factory=dict)
    host_status: Mapping[str, HostStatus] = field(default_factory=dict)
    vms: Mapping[str, VM] = field(default_factory=dict)
    vm_status: Mapping[str, VMStatus] = field(default_factory=dict)
    assignments: Mapping[str, Assignment] = field(default_factory=dict)
    domains: Mapping[str, DomainStatus] = field(default_factory=dict)
    rules: Mapping[str, Rule] = field(default_factory=dict)
    policies: Mapping[str, ScopePolicy] = field(default_factory=dict)
    config: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass(frozen=True, slots=True)
class Leadership:
    is_leader: bool
    leader: str = ""
    fencing_token: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """One etcd change as the cache saw it."""

    revision: int
    type: str  # put | delete
    key: str
    value: bytes = b""


class Backend(Protocol):
    """What operations need from the coordinator's store, cache, planner and election."""

    def view(self) -> ClusterView: ...

    async def fresh_view(self) -> ClusterView:
        """The view once the cache has caught up with etcd's revision now."""
        ...

    def leadership(self) -> Leadership: ...

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """A key's value and mod revision, read from etcd (linearizable)."""
        ...

    async def list_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        """Every (key, value) under `prefix`, read from etcd (for records the cache skips)."""
        ...

    async def commit(
        self,
        compares: Sequence[tuple[str, int]],
        puts: Sequence[tuple[str, bytes]],
        deletes: Sequence[str] = (),
    ) -> bool:
        """One fenced transaction; `compares` are (key, mod revision), 0 meaning absent.
        False when a compare failed (someone wrote first); nothing was written then."""
        ...

    async def place_and_commit(
        self,
        vms: Sequence[VM],
        atomic: bool,
        extra_puts: Sequence[tuple[str, bytes]],
        extra_absent: Sequence[str],
        check: Callable[[Snapshot, Plan], None] | None = None,
        extra_unchanged: Sequence[tuple[str, int]] = (),
    ) -> Plan:
        """Place new VMs and commit VMs, statuses and assignments with `extra_puts` in one
        fenced transaction that also requires every `extra_absent` key to be absent and
        each `extra_unchanged` (key, mod revision) to be as read (Conflict otherwise).
        With `atomic` and a pending VM, nothing is written. `check(snapshot, plan)` runs
        on each attempt's plan before anything is written; what it raises aborts."""
        ...

    def changes(self) -> AsyncIterator[Change]: ...


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class VMView:
    spec: VM
    status: VMStatus | None = None
    domain: DomainStatus | None = None


@dataclass(frozen=True, slots=True)
class HostView:
    info: HostInfo
    status: HostStatus | None = None
    alive: bool = False
    allocatable: Resources = field(default_factory=Resources)
    used: Resources = field(default_factory=Resources)
    vms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleMember:
    name: str
    host: str = ""
    domain: str = ""
    phase: str = ""


@dataclass(frozen=True, slots=True)
class RuleView:
    rule: Rule
    members: tuple[RuleMember, ...] = ()
    satisfied: bool = False
    violations: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FailureImpact:
    failed: str = ""
    stranded: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdmissionReport:
    ok: bool = False  # proto3's default, so that `ok: true` is always written
    policy: str = ""
    impacts: tuple[FailureImpact, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CreateVMsResult:
    # No defaults: a field equal to its default is left out of the JSON, and proto3's
    # default for `ok` is false.
    vms: tuple[VMView, ...]
    admission: AdmissionReport


@dataclass(frozen=True, slots=True)
class RuleResult:
    rule: RuleView
    admission: AdmissionReport


@dataclass(frozen=True, slots=True)
class ClusterStatusView:
    leader: str
    fencing_token: int
    revision: int
    hosts_by_state: Mapping[str, int]
    vms_by_phase: Mapping[str, int]
    pending_by_reason: Mapping[str, int]
    config: ClusterConfig
    headroom: AdmissionReport


@dataclass(frozen=True, slots=True)
class Event:
    revision: int
    kind: str
    type: str
    key: str
    json: str = ""


EVENT_KINDS: Mapping[str, str] = {
    keyspace.VMS: "vm",
    keyspace.VM_STATUS: "vm",
    keyspace.HOSTS: "host",
    keyspace.HOST_STATUS: "host",
    keyspace.RULES: "rule",
    keyspace.POLICIES: "rule",
    keyspace.ASSIGNMENTS: "assignment",
    keyspace.DOMAINS: "domain",
    keyspace.CONFIG: "config",
}


# --------------------------------------------------------------------------- helpers


def _fingerprint(kind: str, payload: object) -> str:
    raw = json.dumps({"kind": kind, "payload": payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


def _join(keys: Sequence[str], limit: int = 5) -> str:
    named = ", ".join(f"`{k}`" for k in keys[:limit])
    return named + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _report(
    result: AdmissionResult, policy: AdmissionPolicy, baseline: AdmissionResult | None
) -> AdmissionReport:
    """The report of a check; with a baseline, only what the request makes worse counts."""
    known = set()
    if baseline is not None:
        known = {(i.failed, s) for i in baseline.impacts for s in i.stranded}
    impacts = []
    warnings = []
    for imp in result.impacts:
        if not imp.failed:
            continue  # the request's own VMs that fit nowhere: placement reports those
        new = tuple(s for s in imp.stranded if (imp.failed, s) not in known)
        if not new:
            continue
        failed = ", ".join(imp.failed)
        impacts.append(
            FailureImpact(
                failed=failed, stranded=new, reasons={k: imp.reasons.get(k, "") for k in new}
            )
        )
        warnings.append(f"losing {failed} would strand {_join(list(new))}")
    return AdmissionReport(
        ok=not impacts, policy=policy.value, impacts=tuple(impacts), warnings=tuple(warnings)
    )


def _refusal(report: AdmissionReport) -> HvplaceError:
    lines = []
    for imp in report.impacts[:5]:
        for vm in imp.stranded[:5]:
            lines.append(f"losing {imp.failed} strands `{vm}` ({imp.reasons.get(vm, '')})")
    more = len(report.impacts) - 5
    tail = f"; and {more} more failure(s)" if more > 0 else ""
    return Unavailable(
        "refused by failover admission (policy refuse): "
        + "; ".join(lines)
        + tail
        + f"; {ADMISSION_NOTE}. Add hosts or capacity, relax the rule, or set the policy to warn"
    )


# --------------------------------------------------------------------------- operations


class Operations:
    """One instance per coordinator; every method is one API call."""

    def __init__(
        self, backend: Backend, admission_on_create: bool = True, mover: Mover | None = None
    ) -> None:
        self.backend = backend
        # The failover simulation costs O(VMs) per create (it dominates the commit
        # benchmark); a deployment may turn it off for VM creates and keep it for rules.
        self.admission_on_create = admission_on_create
        self.images = Catalogue(backend, self._require_leader)
        # Rebalance and --rebalance move VMs through `mover` (None: refused).
        self.rebalancing = Rebalancing(
            lambda: with_degraded(backend.view().snapshot, backend.view().vm_status),
            backend.fresh_view,
            mover,
            self._require_leader,
        )

    # ------------------------------------------------------------------ shared

    def _require_leader(self) -> None:
        lead = self.backend.leadership()
        if not lead.is_leader:
            raise NotLeader(
                f"not the leader; leader is {lead.leader or 'unknown (election under way)'}"
            )

    def _admission(
        self,
        snapshot: Snapshot,
        config: ClusterConfig,
        extra_vms: Sequence[VM] = (),
        extra_rules: Sequence[Rule] = (),
        extra_plan: Plan | None = None,
    ) -> AdmissionReport:
        """SPEC §5.1: refuse (raise) or warn when the change strands VMs after a failure."""
        kw = {"failures": config.admission_failures, "topology_key": config.admission_topology}
        result = check_admission(
            snapshot,
            extra_vms=extra_vms,
            extra_rules=extra_rules,
            extra_plan=extra_plan,
            **kw,  # type: ignore[arg-type]
        )
        if not any(imp.failed for imp in result.impacts):
            return AdmissionReport(ok=True, policy=config.admission_policy.value)
        baseline = check_admission(snapshot, **kw)  # type: ignore[arg-type]
        report = _report(result, config.admission_policy, baseline)
        if not report.ok and config.admission_policy is AdmissionPolicy.REFUSE:
            raise _refusal(report)
        return report

    async def _replay(self, request_id: str, kind: str, fingerprint: str) -> RequestRecord | None:
        """The earlier record of this request, if it was already applied; a different
        payload under the same id is a conflict."""
        found = await self.backend.get(keyspace.request(request_id))
        if found is None:
            return None
        record = models.loads(RequestRecord, found[0])
        if record.kind != kind or record.fingerprint != fingerprint:
            raise Conflict(
                f"request id {request_id!r} was already used for a different {record.kind}"
                " request; use a new id for a new request"
            )
        return record

    # ------------------------------------------------------------------ VMs

    def _vm_view(self, view: ClusterView, key: str) -> VMView:
        vm = view.vms[key]
        status = view.vm_status.get(key)
        derived = self._phase(view, key)
        if status is not None and (status.phase, status.reason) != (
            derived.phase,
            derived.reason,
        ):
            status = dataclasses.replace(status, phase=derived.phase, reason=derived.reason)
        return VMView(spec=vm, status=status, domain=view.domains.get(key))

    @staticmethod
    def _phase(view: ClusterView, key: str) -> phases.Derived:
        """The phase users read, derived from the records now (never stored as such)."""
        a = view.assignments.get(key)
        return phases.derive(
            view.vms[key],
            view.vm_status.get(key),
            a,
            view.domains.get(key),
            view.hosts.get(a.host) if a is not None else None,
        )

    def _find_vm(self, view: ClusterView, scope: str, name: str) -> str:
        check_name(scope, "scope")
        check_name(name, "VM name")
        key = models.vm_key(scope, name)
        if key not in view.vms:
            raise NotFound(f"VM {key} does not exist")
        return key

    @staticmethod
    def _with_images(vms: Sequence[VM], config: ClusterConfig) -> list[VM]:
        """Each VM with its image, or the cluster's default image; without either the
        request is refused, as the VM could boot nowhere. Paths outside the cluster's
        image roots (when it has any) are refused."""
        out = []
        for vm in vms:
            if not models.has_image(vm.image):
                if config.default_image is None:
                    raise InvalidInput(
                        f"VM {vm.key} has no image (a kernel or a base disk) and the cluster"
                        " has no default image; give one"
                    )
                vm = dataclasses.replace(vm, image=config.default_image)
            models.check_image_roots(vm.image, config.image_roots, f"VM {vm.key}")
            out.append(vm)
        return out

    async def create_vms(self, request_id: str, vms: Sequence[VM], atomic: bool) -> CreateVMsResult:
        """Validate all, replay a retried request, check admission, place and commit in one
        fenced transaction (with the request record), or raise with the explanations."""
        if not vms:
            raise InvalidInput("a create request names at least one VM")
        if len(vms) > MAX_BATCH:
            raise InvalidInput(f"{len(vms)} VMs in one request; at most {MAX_BATCH}")
        if request_id:
            check_name(request_id, "request id")
        for vm in vms:
            models.validate_vm(vm)
        requested = vms
        resolved, image_revisions = await self.images.resolve(vms)
        vms = self._with_images(resolved, self.backend.view().config)
        keys = [vm.key for vm in vms]
        dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
        if dupes:
            raise InvalidInput(f"the request names {_join(dupes)} more than once")
        self._require_leader()
        fingerprint = _fingerprint(
            "create_vms", {"atomic": atomic, "vms": [models.to_dict(vm) for vm in requested]}
        )
        if request_id and await self._replay(request_id, "create_vms", fingerprint):
            view = await self.backend.fresh_view()
            return CreateVMsResult(
                vms=tuple(self._vm_view(view, k) for k in keys if k in view.vms),
                admission=AdmissionReport(ok=True),
            )
        view = self.backend.view()
        exists = [k for k in keys if k in view.vms]
        if exists:
            raise Conflict(f"VM(s) {_join(exists)} already exist; delete them or pick new names")
        now = time.time()
        stamped = [
            dataclasses.replace(
                vm, uid=vm.uid or uuid.uuid4().hex, request_id=request_id, created_at=now
            )
            for vm in vms
        ]
        for vm in stamped:
            models.check_vm_size(vm)
        # Admission runs on the planner's own placement of the batch, inside its commit
        # attempt: one placement per attempt, and the report matches what is committed.
        config = view.config
        reports: list[AdmissionReport] = []

        def admission(snapshot: Snapshot, plan: Plan) -> None:
            # Who joins which rule, against this attempt's snapshot (in-flight plans
            # included): at most one rule of each kind per VM, and each rule's max_members.
            rules = snapshot.rules.values()
            membership.check_polarity(stamped, rules)
            joined = {**snapshot.vms, **{vm.key: vm for vm in stamped}}
            membership.check_max_members(joined, rules, stamped)
            if self.admission_on_create:
                placed = None if plan.pending else plan
                reports.append(
                    self._admission(snapshot, config, extra_vms=stamped, extra_plan=placed)
                )

        extra: list[tuple[str, bytes]] = []
        if request_id:
            record = RequestRecord(
                request_id=request_id,
                kind="create_vms",
                targets=tuple(keys),
                fingerprint=fingerprint,
                created_at=now,
            )
            extra.append((keyspace.request(request_id), models.dumps(record)))
        absent = [keyspace.request(request_id)] if request_id else []
        absent.extend(keyspace.vm(vm.scope, vm.name) for vm in stamped)
        try:
            plan = await self.backend.place_and_commit(
                stamped, atomic, extra, absent, admission, image_revisions
            )
        except Conflict:
            # A concurrent retry of this very request won the race: answer as a replay.
            if request_id and await self._replay(request_id, "create_vms", fingerprint):
                view = await self.backend.fresh_view()
                return CreateVMsResult(
                    vms=tuple(self._vm_view(view, k) for k in keys if k in view.vms),
                    admission=AdmissionReport(ok=True),
                )
            raise
        report = reports[-1] if reports else AdmissionReport(ok=True, policy="off")
        if atomic and plan.pending:
            blockers = [
                k for k in keys if k in plan.pending and plan.pending[k].feasible_hosts == 0
            ]
            why = "; ".join(
                f"{k}: {plan.pending[k].summary()}" for k in (blockers or list(plan.pending))[:5]
            )
            raise Unavailable(
                f"atomic batch of {len(keys)} VM(s) not created: {why}"
                " (nothing was written; add capacity or relax the rules)"
            )
        views = []
        for vm in stamped:
            host = plan.assignments.get(vm.key)
            if host is not None:
                status = VMStatus(
                    scope=vm.scope, name=vm.name, phase=Phase.SCHEDULED, host=host, since=now
                )
            else:
                why_e = plan.pending.get(vm.key)
                status = VMStatus(
                    scope=vm.scope,
                    name=vm.name,
                    phase=Phase.PENDING,
                    reason=why_e.summary() if why_e else "",
                    since=now,
                    explanation=why_e,
                )
            views.append(VMView(spec=vm, status=status))
        return CreateVMsResult(vms=tuple(views), admission=report)

    async def get_vm(self, scope: str, name: str) -> VMView:
        view = self.backend.view()
        return self._vm_view(view, self._find_vm(view, scope, name))

    async def list_vms(self, scope: str = "", host: str = "", phase: str = "") -> list[VMView]:
        if scope:
            check_name(scope, "scope")
        if host:
            check_name(host, "host name")
        if phase and phase not in {p.value for p in Phase}:
            raise InvalidInput(
                f"phase {quote(phase)} is not one of {', '.join(p.value for p in Phase)}"
            )
        view = self.backend.view()
        out = []
        for key in sorted(view.vms):
            vm = view.vms[key]
            if scope and vm.scope != scope:
                continue
            status = view.vm_status.get(key)
            placed = view.snapshot.placements.get(key, status.host if status else "")
            if host and placed != host:
                continue
            if phase and self._phase(view, key).phase.value != phase:
                continue
            out.append(self._vm_view(view, key))
        return out

    async def delete_vm(self, scope: str, name: str) -> None:
        """Delete the spec, status and assignment together; the host's agent then stops it."""
        check_name(scope, "scope")
        check_name(name, "VM name")
        self._require_leader()
        vm_key = keyspace.vm(scope, name)
        for _attempt in range(5):
            found = await self.backend.get(vm_key)
            if found is None:
                raise NotFound(f"VM {scope}/{name} does not exist")
            view = await self.backend.fresh_view()
            deletes = [vm_key, keyspace.vm_status(scope, name)]
            host = view.snapshot.placements.get(models.vm_key(scope, name))
            if host:
                deletes.append(keyspace.assignment(host, scope, name))
            if await self.backend.commit([(vm_key, found[1])], [], deletes):
                return
        raise Busy(f"VM {scope}/{name} kept changing while being deleted; retry")

    async def set_power(self, scope: str, name: str, power: Power) -> VMView:
        """Change the desired power state in the spec and in its assignment (which the
        agent reads), in one transaction."""
        check_name(scope, "scope")
        check_name(name, "VM name")
        self._require_leader()
        key = keyspace.vm(scope, name)
        for _attempt in range(5):
            found = await self.backend.get(key)
            if found is None:
                raise NotFound(f"VM {scope}/{name} does not exist")
            vm = dataclasses.replace(models.loads(VM, found[0]), power=power)
            compares = [(key, found[1])]
            puts = [(key, models.dumps(vm))]
            view = await self.backend.fresh_view()
            assignment = view.assignments.get(vm.key)
            if assignment is not None:
                akey = keyspace.assignment(assignment.host, scope, name)
                current = await self.backend.get(akey)
                if current is not None:
                    a = models.loads(Assignment, current[0])
                    compares.append((akey, current[1]))
                    puts.append((akey, models.dumps(dataclasses.replace(a, vm=vm))))
            if power is Power.RUNNING:
                reset = await self._retry_failed(scope, name)
                if reset is not None:
                    compares.append(reset[0])
                    puts.append(reset[1])
            if await self.backend.commit(compares, puts):
                view = await self.backend.fresh_view()
                if vm.key in view.vms:
                    return self._vm_view(view, vm.key)
                return VMView(spec=vm)
        raise Busy(f"VM {scope}/{name} kept changing; retry")

    async def _retry_failed(
        self, scope: str, name: str
    ) -> tuple[tuple[str, int], tuple[str, bytes]] | None:
        """`vm start` on a VM with start failures: the operator's retry clears the count
        (vSphere's restart count); a `failed` VM goes back to pending and is placed
        again. The (compare, put) of the status record, or None when there is nothing."""
        skey = keyspace.vm_status(scope, name)
        found = await self.backend.get(skey)
        if found is None:
            return None
        status = models.loads(VMStatus, found[0])
        if not status.start_failures and status.phase is not Phase.FAILED:
            return None
        tried = ", ".join(f.host for f in status.start_failures) or "-"
        reason = f"retry requested by an operator (had failed to start on {tried})"
        if status.phase is Phase.FAILED:
            reset = dataclasses.replace(
                status,
                phase=Phase.PENDING,
                reason=reason,
                host="",
                since=time.time(),
                start_failures=(),
                explanation=None,
            )
        else:
            reset = dataclasses.replace(status, start_failures=())
        return (skey, found[1]), (skey, models.dumps(reset))

    async def explain_vm(self, scope: str, name: str) -> Explanation:
        view = self.backend.view()
        key = self._find_vm(view, scope, name)
        why = explain(view.snapshot, view.vms[key])
        status = view.vm_status.get(key)
        derived = self._phase(view, key)
        if derived.phase is Phase.FAILED or (status is not None and status.start_failures):
            # Placement alone does not say why a VM is not running: its start failures do.
            failed = {f.host for f in status.start_failures} if status is not None else set()
            row = ReasonCount(
                code=START_FAILED,
                message=f"{derived.phase.value}: {derived.reason}",
                hosts=len(failed),
            )
            why = dataclasses.replace(why, reasons=(row, *why.reasons))
        return why

    # ------------------------------------------------------------------ rules

    def _rule_view(self, view: ClusterView, rule: Rule) -> RuleView:
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
                    name=vm.name,
                    host=host,
                    domain=domain,
                    phase=self._phase(view, key).phase.value,
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

    def _find_rule(self, view: ClusterView, scope: str, name: str) -> Rule:
        check_name(scope, "scope")
        check_name(name, "rule name")
        rule = view.rules.get(f"{scope}/{name}")
        if rule is None:
            raise NotFound(f"rule {scope}/{name} does not exist")
        return rule

    async def create_rule(self, request_id: str, rule: Rule, rebalance: bool) -> RuleResult:
        models.validate_rule(rule)
        if request_id:
            check_name(request_id, "request id")
        self._require_leader()
        fingerprint = _fingerprint("create_rule", models.to_dict(rule))
        if request_id and await self._replay(request_id, "create_rule", fingerprint):
            view = await self.backend.fresh_view()
            return RuleResult(
                rule=self._rule_view(view, self._find_rule(view, rule.scope, rule.name)),
                admission=AdmissionReport(ok=True),
            )
        view = await self.backend.fresh_view()
        if rule.key in view.rules:
            raise Conflict(f"rule {rule.key} already exists; update it or delete it first")
        rule = dataclasses.replace(rule, created_at=time.time())
        if rebalance:
            view = await self._rebalance_for_rule(view, rule)
        validate_rule_change(view.snapshot, rule)
        membership.check_rule_members(rule, view.vms)
        report = self._admission(view.snapshot, view.config, extra_rules=[rule])
        key = keyspace.rule(rule.scope, rule.name)
        compares = [(key, 0)]
        puts = [(key, models.dumps(rule))]
        if request_id:
            rkey = keyspace.request(request_id)
            compares.append((rkey, 0))
            record = RequestRecord(
                request_id=request_id,
                kind="create_rule",
                targets=(rule.key,),
                fingerprint=fingerprint,
                created_at=rule.created_at,
            )
            puts.append((rkey, models.dumps(record)))
        if not await self.backend.commit(compares, puts):
            raise Conflict(f"rule {rule.key} (or request {request_id!r}) was created concurrently")
        view = await self.backend.fresh_view()
        return RuleResult(rule=self._rule_view(view, rule), admission=report)

    async def get_rule(self, scope: str, name: str) -> RuleView:
        view = self.backend.view()
        return self._rule_view(view, self._find_rule(view, scope, name))

    async def list_rules(self, scope: str = "") -> list[RuleView]:
        if scope:
            check_name(scope, "scope")
        view = self.backend.view()
        return [
            self._rule_view(view, view.rules[k])
            for k in sorted(view.rules)
            if not scope or view.rules[k].scope == scope
        ]

    async def update_rule(self, rule: Rule, rebalance: bool) -> RuleResult:
        models.validate_rule(rule)
        self._require_leader()
        key = keyspace.rule(rule.scope, rule.name)
        found = await self.backend.get(key)
        if found is None:
            raise NotFound(f"rule {rule.key} does not exist")
        old = models.loads(Rule, found[0])
        rule = dataclasses.replace(rule, created_at=old.created_at)
        view = await self.backend.fresh_view()
        if rebalance:
            view = await self._rebalance_for_rule(view, rule, old)
        validate_rule_change(view.snapshot, rule, old=old)
        membership.check_rule_members(rule, view.vms)
        others = {k: r for k, r in view.snapshot.rules.items() if k != rule.key}
        snapshot = dataclasses.replace(view.snapshot, rules=others)
        report = self._admission(snapshot, view.config, extra_rules=[rule])
        if not await self.backend.commit([(key, found[1])], [(key, models.dumps(rule))]):
            raise Busy(f"rule {rule.key} changed while being updated; read it again and retry")
        view = await self.backend.fresh_view()
        return RuleResult(rule=self._rule_view(view, rule), admission=report)

    async def delete_rule(self, scope: str, name: str, force: bool) -> None:
        check_name(scope, "scope")
        check_name(name, "rule name")
        self._require_leader()
        key = keyspace.rule(scope, name)
        found = await self.backend.get(key)
        if found is None:
            raise NotFound(f"rule {scope}/{name} does not exist")
        rule = models.loads(Rule, found[0])
        view = await self.backend.fresh_view()
        members = sorted(vm.name for vm in view.vms.values() if rule.selects(vm))
        if members and not force:
            raise Conflict(
                f"rule {rule.key} still has {len(members)} member(s): {_join(members)};"
                " delete them first or force the deletion"
            )
        if not await self.backend.commit([(key, found[1])], [], [key]):
            raise Busy(f"rule {rule.key} changed while being deleted; retry")

    async def _rebalance_for_rule(
        self, view: ClusterView, rule: Rule, old: Rule | None = None
    ) -> ClusterView:
        """`--rebalance`: move VMs until `rule` holds (every other check first, on the
        rules alone), then the fresh view to validate and commit the rule against."""
        unplaced = dataclasses.replace(view.snapshot, placements={}, reservations={})
        validate_rule_change(unplaced, rule, old=old)
        membership.check_rule_members(rule, view.vms)
        others = {k: r for k, r in view.snapshot.rules.items() if old is None or k != old.key}
        changed = dataclasses.replace(view.snapshot, rules={**others, rule.key: rule})
        broken = newly_broken(view.snapshot, changed) | (
            frozenset({rule.key}) if old is not None else frozenset()
        )
        if rule.required:
            await self.rebalancing.make_hold(changed, f"rule {rule.key}", broken)
        return await self.backend.fresh_view()

    async def set_policy(self, policy: ScopePolicy, rebalance: bool = False) -> ScopePolicy:
        models.validate_policy(policy)
        self._require_leader()
        key = keyspace.policy(policy.scope)
        found = await self.backend.get(key)
        view = await self.backend.fresh_view()
        if rebalance:
            changed = dataclasses.replace(
                view.snapshot, policies={**view.snapshot.policies, policy.scope: policy}
            )
            broken = newly_broken(view.snapshot, changed)
            await self.rebalancing.make_hold(changed, f"scope `{policy.scope}` policy", broken)
            found = await self.backend.get(key)
            view = await self.backend.fresh_view()
        validate_policy_change(view.snapshot, policy)
        snapshot = dataclasses.replace(
            view.snapshot, policies={**view.snapshot.policies, policy.scope: policy}
        )
        self._admission(snapshot, view.config)
        compare = (key, found[1] if found else 0)
        if not await self.backend.commit([compare], [(key, models.dumps(policy))]):
            raise Busy(f"scope {policy.scope} policy changed concurrently; retry")
        return policy

    async def get_policy(self, scope: str) -> ScopePolicy:
        check_name(scope, "scope")
        return self.backend.view().policies.get(scope, ScopePolicy(scope=scope))

    # ------------------------------------------------------------------ hosts

    def _host_view(self, view: ClusterView, name: str) -> HostView:
        info = view.hosts.get(name) or HostInfo(name=name)
        status = view.host_status.get(name)
        if name not in view.hosts and (status is None or status.state is not HostState.LOST):
            # Named by assignments, not registered: lost, whether or not the leader has
            # recorded it yet (it does within one lease TTL of taking office).
            status = HostStatus(
                name=name,
                state=HostState.LOST,
                reason="not registered; the leader marks it lost within one lease TTL",
            )
        elif name in view.hosts and host_state(info, status) is HostState.DEGRADED:
            # Derived from the agent's report, shown where the state is read.
            status = HostStatus(
                name=name,
                state=HostState.DEGRADED,
                reason=f"libvirt unusable: {info.hypervisor_error}",
                since=info.hypervisor_error_since,
            )
        host = view.snapshot.hosts.get(name) or Host.from_records(info, status)
        on_host = sorted(k for k, h in view.snapshot.placements.items() if h == name)
        used = Resources(
            vcpus=sum(view.vms[k].resources.vcpus for k in on_host if k in view.vms),
            memory_mib=sum(view.vms[k].resources.memory_mib for k in on_host if k in view.vms),
            disk_gib=sum(view.vms[k].resources.disk_gib for k in on_host if k in view.vms),
        )
        return HostView(
            info=info,
            status=status,
            alive=name in view.hosts,
            allocatable=host.allocatable(),
            used=used,
            vms=tuple(on_host),
        )

    def _find_host(self, view: ClusterView, name: str) -> None:
        check_name(name, "host name")
        known = name in view.hosts or name in view.host_status or name in view.snapshot.hosts
        if not known:
            raise NotFound(f"host {name} is not registered")

    async def list_hosts(self) -> list[HostView]:
        view = self.backend.view()
        names = sorted(set(view.hosts) | set(view.host_status) | set(view.snapshot.hosts))
        return [self._host_view(view, n) for n in names]

    async def get_host(self, name: str) -> HostView:
        view = self.backend.view()
        self._find_host(view, name)
        return self._host_view(view, name)

    async def _set_host_state(self, name: str, state: HostState, reason: str) -> HostView:
        check_name(name, "host name")
        self._require_leader()
        key = keyspace.host_status(name)
        for _attempt in range(5):
            view = await self.backend.fresh_view()
            self._find_host(view, name)
            found = await self.backend.get(key)
            current = models.loads(HostStatus, found[0]) if found else None
            if current is not None and current.state is HostState.LOST:
                raise Conflict(f"host {name} is lost; it takes a new state when its agent returns")
            status = HostStatus(name=name, state=state, reason=reason, since=time.time())
            if current is not None and current.state is state:
                return self._host_view(view, name)
            if await self.backend.commit(
                [(key, found[1] if found else 0)], [(key, models.dumps(status))]
            ):
                return self._host_view(await self.backend.fresh_view(), name)
        raise Busy(f"host {name} status kept changing; retry")

    async def cordon(self, name: str) -> HostView:
        return await self._set_host_state(name, HostState.CORDONED, "cordoned by an operator")

    async def uncordon(self, name: str) -> HostView:
        return await self._set_host_state(name, HostState.READY, "uncordoned by an operator")

    async def drain(self, name: str) -> HostView:
        return await self._set_host_state(
            name,
            HostState.DRAINING,
            "draining: takes no new VMs; moving its VMs away (live migration) is not"
            " implemented yet, they keep running here",
        )

    # ------------------------------------------------------------------ cluster

    async def cluster_status(self) -> ClusterStatusView:
        view = self.backend.view()
        lead = self.backend.leadership()
        hosts_by_state: Counter[str] = Counter()
        for name in set(view.hosts) | set(view.host_status) | set(view.snapshot.hosts):
            state = host_state(view.hosts.get(name), view.host_status.get(name)).value
            if name not in view.hosts:
                state = HostState.LOST.value
            hosts_by_state[state] += 1
        vms_by_phase: Counter[str] = Counter()
        pending_by_reason: Counter[str] = Counter()
        for key in view.vms:
            vm_status = view.vm_status.get(key)
            phase = self._phase(view, key).phase.value
            vms_by_phase[phase] += 1
            if phase == Phase.PENDING.value:
                e = vm_status.explanation if vm_status else None
                code = e.reasons[0].code if e and e.reasons else "unplaced"
                pending_by_reason[code] += 1
        cfg = view.config
        result = check_admission(
            view.snapshot, failures=cfg.admission_failures, topology_key=cfg.admission_topology
        )
        headroom = _report(result, cfg.admission_policy, None)
        return ClusterStatusView(
            leader=lead.leader,
            fencing_token=lead.fencing_token,
            revision=view.revision,
            hosts_by_state=dict(hosts_by_state),
            vms_by_phase=dict(vms_by_phase),
            pending_by_reason=dict(pending_by_reason),
            config=cfg,
            headroom=headroom,
        )

    async def check_headroom(self) -> AdmissionReport:
        return (await self.cluster_status()).headroom

    async def simulate(
        self, fail_hosts: Sequence[str], topology_key: str = "", domain: str = ""
    ) -> whatif.SimulateResult:
        """What-if on a copy of the snapshot: changes nothing."""
        view = self.backend.view()
        lost = whatif.failed_hosts(view.snapshot, fail_hosts, topology_key, domain)
        return whatif.simulate_failure(view.snapshot, lost)

    async def events(self, kinds: str) -> AsyncIterator[Event]:
        wanted = {k.strip() for k in kinds.split(",") if k.strip()}
        unknown = wanted - set(EVENT_KINDS.values())
        if unknown:
            raise InvalidInput(
                f"event kind(s) {quote(', '.join(sorted(unknown)))} unknown; use"
                f" {', '.join(sorted(set(EVENT_KINDS.values())))}"
            )
        async for change in self.backend.changes():
            kind = next((k for p, k in EVENT_KINDS.items() if change.key.startswith(p)), "")
            if not kind or (wanted and kind not in wanted):
                continue
            yield Event(
                revision=change.revision,
                kind=kind,
                type=change.type,
                key=change.key,
                json=change.value.decode(errors="replace"),
            )
