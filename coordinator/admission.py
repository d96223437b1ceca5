"""Failover admission of a change (SPEC §5.1) as the API answers it: the cluster's policy
applied to placement's simulation (placement/admission.py), the report only of what the
change makes worse, and the refusal under policy `refuse`. Pure: no IO."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hvplace.coordinator.placement import AdmissionResult, Plan, check_admission, membership
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.errors import HvplaceError, Unavailable
from hvplace.proto.records import VM, AdmissionPolicy, ClusterConfig, Rule

ADMISSION_NOTE = (
    "the cluster could not re-place these VMs after that failure with every required rule"
)


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
class AdmissionCheck:
    """The cluster's admission settings a change is checked against (from its config)."""

    policy: AdmissionPolicy
    failures: int
    topology_key: str
    simulate: bool = True
    """False: only who joins which rule is checked (no failover simulation: a deployment
    may turn it off for creates, as it dominates the commit path's cost)."""

    @classmethod
    def of(cls, config: ClusterConfig, simulate: bool = True) -> AdmissionCheck:
        return cls(
            config.admission_policy,
            config.admission_failures,
            config.admission_topology,
            simulate,
        )

    def run(
        self,
        snapshot: Snapshot,
        extra_vms: Sequence[VM] = (),
        extra_rules: Sequence[Rule] = (),
        extra_plan: Plan | None = None,
    ) -> AdmissionReport:
        """The report of the change (new VMs, placed by `extra_plan` when given; new or
        changed rules) on `snapshot`; raises Unavailable when the policy refuses it.
        New VMs first join their rules against this very snapshot (in-flight plans
        included): at most one rule of each kind per VM, and each rule's max_members."""
        if extra_vms:
            rules = snapshot.rules.values()
            membership.check_polarity(extra_vms, rules)
            if any(r.max_members for r in rules):
                joined = snapshot.overlaid({vm.key: vm for vm in extra_vms}, {})
                membership.check_max_members(joined, rules, extra_vms)
        if not self.simulate:
            return AdmissionReport(ok=True, policy="off")
        result = check_admission(
            snapshot,
            failures=self.failures,
            topology_key=self.topology_key,
            extra_vms=extra_vms,
            extra_rules=extra_rules,
            extra_plan=extra_plan,
        )
        if not any(imp.failed for imp in result.impacts):
            return AdmissionReport(ok=True, policy=self.policy.value)
        baseline = check_admission(snapshot, failures=self.failures, topology_key=self.topology_key)
        report = _report(result, self.policy, baseline)
        if not report.ok and self.policy is AdmissionPolicy.REFUSE:
            raise _refusal(report)
        return report

    def headroom(self, snapshot: Snapshot) -> AdmissionReport:
        """What the cluster as it stands would strand (never refuses: it is a reading)."""
        result = check_admission(snapshot, failures=self.failures, topology_key=self.topology_key)
        return _report(result, self.policy, None)


def combined(reports: Sequence[AdmissionReport]) -> AdmissionReport:
    """The reports of one change checked in parts (a batch committed in chunks)."""
    return AdmissionReport(
        ok=all(r.ok for r in reports),
        policy=reports[0].policy if reports else "",
        impacts=tuple(i for r in reports for i in r.impacts),
        warnings=tuple(w for r in reports for w in r.warnings),
    )


def join_keys(keys: Sequence[str], limit: int = 5) -> str:
    """`a`, `b` and 3 more: the keys a message names."""
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
        warnings.append(f"losing {failed} would strand {join_keys(list(new))}")
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
