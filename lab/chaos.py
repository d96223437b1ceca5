"""The fault campaign (`hvplace lab chaos`): the lab's workload under rules, seeded random
faults one at a time and overlapping, each followed by its repair, judged by lab/checker.py.

The campaign starts its own lab (own prefix, subnet and state dir, beside any running
lab), runs, takes it down and checks that nothing is left. Every wait is for a condition
read from etcd or from the checker's samples, bounded by the budget the coordinators print
(lease TTL + failover delay) plus a start margin; the whole run is bounded by --max-time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from hvplace.lab import daemons, workload
from hvplace.lab.checker import Checker, Episode, Sample, leftovers, vm_ok
from hvplace.lab.control import Lab, LabError, scratch_settings
from hvplace.lab.daemons import DaemonError, cluster_budget
from hvplace.lab.hosts import HostError
from hvplace.lab.processes import ProcessRecord, is_alive
from hvplace.lab.workload import WorkloadError

KINDS = (
    "agent_kill",
    "host_kill",
    "partition",
    "leader_kill",
    "coordinators_kill",
    "etcd_restart",
    "libvirtd_restart",
    "poison_vm",
)
HOST_KINDS = frozenset({"agent_kill", "host_kill", "partition", "libvirtd_restart"})
# Faults during which no coordinator can move anything: overlapping faults get their time.
BLOCKING_KINDS = frozenset({"coordinators_kill", "etcd_restart"})
REAL_ONLY = frozenset({"libvirtd_restart"})

# The default of `--kinds`, and what CI runs: every kind (libvirtd_restart needs real
# hosts: a test:/// hypervisor lives inside its agent).
PASSING_TEST = tuple(k for k in KINDS if k not in REAL_ONLY)
PASSING_REAL = tuple(KINDS)

ETCD_MEMBERS = 3
"""The campaign's lab runs a 3-member etcd, as production should: an etcd fault kills
one member (and restarts it), which must fence nothing and move nothing."""

START_MARGIN_S = {"real": 20.0, "test": 8.0}
"""Beyond lease TTL + failover delay: committing the moves and starting the domains on a
loaded 2-core machine (QEMU under TCG on real hosts)."""

OVERLAP_P = 0.3
EARLY_REPAIR_P = 0.25
POISON_SCOPE = "chaos"


class ChaosError(RuntimeError):
    pass


@dataclass
class Fault:
    index: int
    kind: str
    target: str
    started_at: float
    budget_s: float
    affected: set[str] = field(default_factory=set)
    early_repair_at: float | None = None  # time.time(); None: repaired once recovered
    repaired_at: float | None = None
    ended_at: float | None = None
    recovery_s: float | None = None
    late: bool = False
    detail: str = ""

    @property
    def deadline(self) -> float:
        return self.started_at + self.budget_s


@dataclass
class Report:
    seed: int
    mode: str
    faults: list[Fault] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # late, unsettled, agent deaths, ...
    duplicates: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    agent_deaths: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    watchdog_resets: list[str] = field(default_factory=list)  # hosts rebooted after one
    samples: int = 0
    max_gap_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def late(self) -> list[Fault]:
        return [f for f in self.faults if f.late]

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.faults:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def worst(self) -> dict[str, float | None]:
        """Per kind, the longest recovery; None when one never recovered in its window."""
        out: dict[str, float | None] = {}
        for f in self.faults:
            if f.kind in out and out[f.kind] is None:
                continue
            if f.recovery_s is None:
                out[f.kind] = None
            else:
                out[f.kind] = round(max(f.recovery_s, out.get(f.kind) or 0.0), 2)
        return out

    @property
    def passed(self) -> bool:
        return not (
            self.duplicates
            or self.violations
            or self.lost
            or self.late
            or self.leftovers
            or self.agent_deaths
            or self.unsettled
            or self.problems
        )

    def summary(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "mode": self.mode,
            "faults": len(self.faults),
            "by_kind": self.by_kind(),
            "violations": len(self.violations),
            "duplicates": len(self.duplicates),
            "lost": len(self.lost),
            "late": len(self.late),
            "unsettled": len(self.unsettled),
            "agent_deaths": len(self.agent_deaths),
            "watchdog_resets": len(self.watchdog_resets),
            "errors": len(self.problems),
            "leftovers": len(self.leftovers),
            "worst_recovery_s": self.worst(),
            "samples": self.samples,
            "max_sample_gap_s": round(self.max_gap_s, 3),
            "elapsed_s": round(self.elapsed_s, 1),
            "passed": self.passed,
        }

    def table(self) -> str:
        rows = [("#", "KIND", "TARGET", "AFFECTED", "RECOVERY", "BUDGET", "VERDICT")]
        for f in self.faults:
            recovery = "-" if f.recovery_s is None else f"{f.recovery_s:.1f}s"
            rows.append(
                (
                    str(f.index),
                    f.kind,
                    f.target or "-",
                    str(len(f.affected)),
                    recovery,
                    f"{f.budget_s:.1f}s",
                    ("LATE " if f.late else "ok ") + f.detail,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=True)) + "  " + r[6]
                 for r in rows]  # fmt: skip
        for title, items in (
            ("duplicates (a VM active on two hosts)", self.duplicates),
            ("required rules broken", self.violations),
            ("lost VMs", self.lost),
            ("agents that died of a poison VM", self.agent_deaths),
            ("not settled after a repair", self.unsettled),
            ("left after lab down", self.leftovers),
            ("campaign errors", self.problems),
        ):
            lines.append(f"{title}: {len(items)}")
            lines += [f"  {item}" for item in items[:100]]
        return "\n".join(lines)


# -- etcd: one seam for the member to break ----------------------------------------------


def etcd_members(lab: Lab) -> list[int]:
    """The etcd members a fault may hit (1-based): the campaign's lab runs three, and
    losing any one must fence nothing."""
    return list(range(1, len(lab.state().etcd_members) + 1))


def kill_etcd_member(lab: Lab, member: int) -> None:
    lab.kill_etcd(member=member)


def restart_etcd_member(lab: Lab, member: int) -> None:
    lab.restart_etcd(member=member)


# -- the campaign ---------------------------------------------------------------------


class Campaign:
    def __init__(
        self,
        lab: Lab,
        checker: Checker,
        rng: random.Random,
        kinds: Sequence[str],
        out: TextIO,
        max_time_s: float,
        report: Report,
    ) -> None:
        self.lab = lab
        self.checker = checker
        self.rng = rng
        self.kinds = list(kinds)
        self.out = out
        self.deadline = time.monotonic() + max_time_s
        state = lab.state()
        self.mode = state.mode
        budget = cluster_budget(state.lease_ttl)
        self.lease_ttl = budget.lease_ttl_s
        self.fence_after = budget.fence_after_s
        self.base_budget = budget.lease_ttl_s + budget.failover_delay_s + START_MARGIN_S[self.mode]
        self.created: set[str] = set()
        self.poison: set[str] = set()
        self.report = report
        self.group: list[Fault] = []
        self.t0 = time.time()
        self._agents_before_poison: dict[str, ProcessRecord | None] = {}
        self._next = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- reading the checker ---------------------------------------------------------

    def wait(self, what: str, cond: Callable[[Sample], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sample = self.checker.latest()
            if sample is not None and cond(sample):
                return True
            time.sleep(0.1)
        self.say(f"   .. not reached after {timeout:.0f}s: {what}")
        return False

    def settled(self, sample: Sample) -> bool:
        """Every process up, every host registered, every VM (but poison) running once."""
        records = sample.records
        if records is None:
            return False
        state = self.lab.state()
        if not all(is_alive(h.agent) for h in state.hosts.values()):
            return False
        if not all(is_alive(c.process) for c in state.coordinators):
            return False
        if not set(state.hosts) <= records.registered or not records.candidates:
            return False
        where = sample.where()
        return all(len(set(where.get(k, ()))) == 1 for k in self.created - self.poison)

    # -- the run ---------------------------------------------------------------------

    def setup(self) -> None:
        self.say("== workload: rules and VMs")
        self.created |= set(workload.create(self.lab))
        if not self.wait("the workload running", self.settled, 180):
            raise ChaosError("the workload never ran: the lab is unusable")

    def run(self, count: int) -> Report:
        started = time.monotonic()
        while len(self.report.faults) < count:
            if time.monotonic() > self.deadline:
                self.report.problems.append("stopped early: --max-time reached")
                self.say("!! --max-time reached: no more faults")
                break
            group = [self.pick(exclude=())]
            if len(self.report.faults) + 1 < count and self.rng.random() < OVERLAP_P:
                second = self.pick(exclude=group)
                if second is not None:
                    group.append(second)
            chosen = [g for g in group if g is not None]
            # A poison VM is an API request: it goes first, before an overlapping fault
            # may hold every coordinator down until its repair.
            chosen.sort(key=lambda g: g[0] != "poison_vm")
            if not chosen:
                self.report.problems.append("no fault could be chosen")
                break
            try:
                self.run_group(chosen)
            except (LabError, WorkloadError) as exc:
                # A fault that could not be injected (no leader to kill, the API refused
                # the poison VM while its leader changed...): noted, and the
                # campaign goes on; what left the lab so is in the report already.
                self.report.problems.append(f"fault not injected: {exc}")
                self.say(f"!! fault not injected: {exc}")
                self.revive()
        self.report.elapsed_s = time.monotonic() - started
        return self.report

    def pick(self, exclude: Iterable[tuple[str, str] | None]) -> tuple[str, str] | None:
        """(kind, target) for the next fault, compatible with those in `exclude`."""
        taken = [e for e in exclude if e is not None]
        hosts = sorted(self.lab.state().hosts)
        kinds = [k for k in self.kinds if not (k in REAL_ONLY and self.mode != "real")]
        if taken:
            busy_kinds = {k for k, _ in taken}
            busy_hosts = {t for _, t in taken}
            kinds = [
                k
                for k in kinds
                if not (k in BLOCKING_KINDS and busy_kinds & BLOCKING_KINDS)
                and not ({k} | busy_kinds) >= {"leader_kill", "coordinators_kill"}
                and not (k == "leader_kill" and "leader_kill" in busy_kinds)
            ]
            hosts = [h for h in hosts if h not in busy_hosts]
        if not kinds:
            return None
        kind = self.rng.choice(kinds)
        if kind in HOST_KINDS:
            # A host with VMs: failover leaves the one repaired last empty (nothing
            # rebalances), and killing an empty host tests little.
            sample = self.checker.latest()
            busy = sample.running if sample is not None else {}
            loaded = [h for h in hosts if busy.get(h)]
            if not (loaded or hosts):
                return None
            return kind, self.rng.choice(loaded or hosts)
        if kind == "etcd_restart":
            return kind, f"member{self.rng.choice(etcd_members(self.lab))}"
        return kind, ""

    def run_group(self, group: list[tuple[str, str]]) -> None:
        faults: list[Fault] = []
        self.group = faults
        delays = [0.0] + [self.rng.uniform(0.0, self.lease_ttl) for _ in group[1:]]
        starts = [time.time() + d for d in delays]
        to_start = list(zip(starts, group, strict=True))
        hard_end = time.time() + 4 * self.base_budget + self.lease_ttl * 2
        while True:
            now = time.time()
            while to_start and to_start[0][0] <= now:
                _, (kind, target) = to_start.pop(0)
                faults.append(self.inject(kind, target))
            for fault in faults:
                if fault.repaired_at is None and self.repair_due(fault, now):
                    self.repair(fault)
            if not to_start and all(f.repaired_at is not None for f in faults):
                break
            if now > hard_end:
                for fault in faults:
                    if fault.repaired_at is None:
                        self.repair(fault)
                break
            time.sleep(0.1)
        # The cluster whole again (every repair done): how long that took is checked too.
        repaired = max(f.repaired_at or f.started_at for f in faults)
        # Settled, and past the lease TTL of the last fault: what a killed agent's old
        # lease takes with it when it expires belongs to this group, not the next.
        quiet = max(f.started_at for f in faults) + self.lease_ttl + 1.0

        def settled(s: Sample) -> bool:
            self.reboot_reset_hosts(faults)
            return s.at >= quiet and self.settled(s)

        if not self.wait("the cluster settled", settled, self.base_budget * 2):
            sample = self.checker.latest()
            self.report.unsettled.append(
                f"after fault(s) {[f.index for f in faults]}: {self.unsettled_detail(sample)}"
            )
            self.say(f"!! not settled: {self.report.unsettled[-1]}")
            self.revive()
        end = time.time()
        for fault in faults:
            fault.ended_at = end
        self.judge(faults, repaired)
        for fault in faults:
            verdict = f"LATE ({fault.detail})" if fault.late else "ok"
            rec = "-" if fault.recovery_s is None else f"{fault.recovery_s:.1f}s"
            self.say(
                f"   fault {fault.index} {fault.kind} {fault.target}: {len(fault.affected)}"
                f" affected, recovered in {rec} (budget {fault.budget_s:.1f}s): {verdict}"
                f" {sorted(fault.affected)[:8]}"
            )

    def reboot_reset_hosts(self, faults: list[Fault]) -> None:
        """A host its watchdog reset (its agent and libvirtd both gone, once every repair
        is done) reboots, as a real one would: systemd starts libvirtd and the agent. The
        reset itself is the safe outcome of a fence that was late (a partition under load)
        or of an agent that died or came back too late; it is counted, not failed."""
        state = self.lab.state()
        for host in state.hosts.values():
            if host.mode != "real" or is_alive(host.agent) or is_alive(host.libvirtd):
                continue
            self.report.watchdog_resets.append(
                f"after fault(s) {[f.index for f in faults]}: {host.name}"
            )
            self.say(f"   {host.name} was reset by its watchdog: rebooting it")
            try:
                self.lab.start_host(host.name)
            except (LabError, HostError, DaemonError) as exc:
                self.report.problems.append(f"reboot of {host.name} failed: {exc}")

    def revive(self) -> None:
        """Restart what died by itself (as systemd's Restart= would), so that one product
        bug does not void the rest of the campaign; what died is in the report already."""
        state = self.lab.state()
        try:
            for host in state.hosts.values():
                if host.mode == "real" and not is_alive(host.libvirtd):
                    self.lab.start_libvirtd(host.name)
                if not is_alive(host.agent):
                    self.lab.start_agent(host.name)
            for coordinator in state.coordinators:
                if not is_alive(coordinator.process):
                    self.lab.start_coordinator(coordinator.name)
        except (LabError, HostError, DaemonError) as exc:
            self.report.problems.append(f"revive failed: {exc}")
            return
        self.wait("the cluster settled after the revival", self.settled, self.base_budget * 2)

    def unsettled_detail(self, sample: Sample | None) -> str:
        if sample is None or sample.records is None:
            return "etcd unreadable"
        where = sample.where()
        bad = []
        for key in sorted(self.created - self.poison):
            hosts = where.get(key, [])
            if len(set(hosts)) != 1:
                status = sample.records.status.get(key)
                phase = f"{status.phase} {status.reason!r}" if status else "no status"
                bad.append(f"{key} on {hosts or 'no host'} ({phase})")
        state = self.lab.state()
        dead = [h for h, r in state.hosts.items() if not is_alive(r.agent)]
        unregistered = sorted(set(state.hosts) - sample.records.registered)
        gone = [c.name for c in state.coordinators if not is_alive(c.process)]
        return (
            f"VMs {bad}; agents dead {dead}; unregistered {unregistered}; coordinators dead {gone}"
        )

    # -- faults ----------------------------------------------------------------------

    def inject(self, kind: str, target: str) -> Fault:
        self._next += 1
        sample = self.checker.latest()
        where = sample.where() if sample is not None else {}
        fault = Fault(self._next, kind, target, time.time(), self.base_budget)
        if kind in HOST_KINDS:
            fault.affected = {k for k, hosts in where.items() if target in hosts}
        early = self.rng.random() < EARLY_REPAIR_P
        self.say(f"-> fault {fault.index}: {kind} {target}".rstrip())
        lab = self.lab
        if kind == "agent_kill":
            lab.kill_agent(target)
            if early:  # back inside the fence window: it must adopt its guests
                fault.early_repair_at = time.time() + self.rng.uniform(0.2, self.fence_after * 0.7)
        elif kind == "host_kill":
            lab.kill_host(target)
            if early:
                fault.early_repair_at = time.time() + self.rng.uniform(0.5, self.lease_ttl)
        elif kind == "partition":
            lab.partition(target)
            if early:
                fault.early_repair_at = time.time() + self.rng.uniform(0.2, self.fence_after * 0.7)
        elif kind == "libvirtd_restart":
            lab.kill_libvirtd(target)
            fault.early_repair_at = time.time() + self.rng.uniform(0.5, 5.0)
        elif kind == "leader_kill":
            fault.target = lab.kill_leader()
            fault.early_repair_at = time.time() + self.rng.uniform(0.5, 3.0)
        elif kind == "coordinators_kill":
            lab.kill_coordinators()
            fault.early_repair_at = time.time() + self.rng.uniform(0.5, 1.5 * self.lease_ttl)
        elif kind == "etcd_restart":
            kill_etcd_member(lab, int(target.removeprefix("member")))
            fault.early_repair_at = time.time() + self.rng.uniform(0.1, 1.0)
        elif kind == "poison_vm":
            fault.target = self.create_poison(fault.index)
            fault.affected = {fault.target}
            # Its clock starts when the API has accepted it (the CLI's own start is slow).
            fault.started_at = time.time()
        else:
            raise ChaosError(f"unknown fault kind {kind!r}")
        return fault

    def create_poison(self, index: int) -> str:
        """A VM the API accepts and no host can run. Real hosts: a "kernel" that exists but
        is no kernel (the guest's initramfs: libvirt defines the domain, QEMU refuses to
        boot it), or one that does not exist on the hosts: it fails to start on each host
        it is tried on and ends `failed` with the reasons; test:/// never opens the
        kernel, so there: more memory than any host has (pending with the reason)."""
        name = f"poison-{index}-{uuid.uuid4().hex[:4]}"
        if self.mode == "real":
            image = self.lab.state().guest_image or {}
            not_a_kernel = image.get("initrd", "/nonexistent/hvplace-chaos/initrd")
            kernel = self.rng.choice([not_a_kernel, "/nonexistent/hvplace-chaos/vmlinuz"])
            spec = ["--memory", "128", "--kernel", kernel]
        else:
            spec = ["--memory", str(1024 * 1024), "--kernel", "/vmlinuz"]  # 1 TiB
        agents = {h: r.agent for h, r in self.lab.state().hosts.items() if is_alive(r.agent)}
        self._agents_before_poison = agents
        create = ["vm", "create", "--scope", POISON_SCOPE, name, "--vcpus", "1", *spec]
        request = ["--request-id", uuid.uuid4().hex]  # a retry makes one VM
        # An overlapping fault may hold every coordinator down (both killed, restarted one
        # after the other): wait as long as the campaign waits for a cluster to settle.
        deadline = time.monotonic() + self.base_budget * 2
        while True:
            try:
                workload.hvplace(self.lab, *create, *request)
                break
            except WorkloadError as exc:
                # A new leader takes a moment to serve: `unavailable` is worth a retry.
                if "unavailable" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        key = f"{POISON_SCOPE}/{name}"
        self.created.add(key)
        self.poison.add(key)
        return key

    def repair_due(self, fault: Fault, now: float) -> bool:
        if fault.early_repair_at is not None:
            return now >= fault.early_repair_at
        if now >= fault.deadline + self.blocked_s(fault, now):
            return True
        if fault.kind == "poison_vm":
            return False  # watched for its whole budget: "pending" at first proves little
        sample = self.checker.latest()
        return sample is not None and self.recovered(fault, sample)

    def blocked_s(self, fault: Fault, now: float) -> float:
        """How long another fault of the group held the control plane down while this one
        waited (plus the session TTL a coordinator takes to lead again): added to its budget."""
        total = 0.0
        for other in self.group:
            if other is fault or other.kind not in BLOCKING_KINDS:
                continue
            until = now if other.repaired_at is None else other.repaired_at + self.lease_ttl
            total += max(0.0, min(until, now) - max(other.started_at, fault.started_at))
        return total

    def recovered(self, fault: Fault, sample: Sample) -> bool:
        """The fault's affected VMs are where a held fault should leave them: running
        once away from the failed host, or pending/failed with a reason."""
        records = sample.records
        where = sample.where()
        for key in fault.affected:
            if not vm_ok(key, where, records):
                return False
            if fault.kind in HOST_KINDS and fault.target in where.get(key, ()):
                return False
        return True

    def repair(self, fault: Fault) -> None:
        lab = self.lab
        kind, target = fault.kind, fault.target
        fault.repaired_at = time.time()
        try:
            if kind == "agent_kill":
                lab.start_agent(target)
            elif kind == "host_kill":
                lab.start_host(target)
            elif kind == "partition":
                lab.heal(target)
            elif kind == "libvirtd_restart":
                lab.start_libvirtd(target)
            elif kind == "leader_kill":
                lab.start_coordinator(target)
            elif kind == "coordinators_kill":
                names = [c.name for c in lab.state().coordinators]
                first = self.rng.choice(names)
                lab.start_coordinator(first)
                # The other comes back once the first leads: the lab keeps its standby.
                self.wait(
                    "a leader after the restart",
                    lambda _s: daemons.leader_name(lab.state()) is not None,
                    self.base_budget,
                )
                for name in names:
                    if name != first:
                        lab.start_coordinator(name)
            elif kind == "etcd_restart":
                restart_etcd_member(lab, int(target.removeprefix("member")))
            elif kind == "poison_vm":
                self.check_poison(fault)
        except LabError as exc:
            self.report.problems.append(f"fault {fault.index} {kind}: repair failed: {exc}")
            self.say(f"!! repair of fault {fault.index} failed: {exc}")
        self.say(f"   repaired fault {fault.index} ({kind} {target})".rstrip())

    def check_poison(self, fault: Fault) -> None:
        """No agent died of it; then it is deleted (its verdict is in the samples)."""
        state = self.lab.state()
        for host, record in self._agents_before_poison.items():
            now = state.hosts[host].agent
            reset = state.hosts[host].mode == "real" and not is_alive(state.hosts[host].libvirtd)
            # A watchdog reset (an overlapping partition or agent kill) takes libvirtd too;
            # a poison VM could take the agent alone.
            if now == record and not is_alive(record) and not reset:
                self.report.agent_deaths.append(f"fault {fault.index}: the agent of {host} died")
        sample = self.checker.latest()
        status = sample.records.status.get(fault.target) if sample and sample.records else None
        fault.detail = f"{status.phase} {status.reason[:80]!r}" if status else "no status"
        scope, _, name = fault.target.partition("/")
        workload.hvplace(self.lab, "vm", "delete", "--scope", scope, name, check=False)
        self.created.discard(fault.target)

    # -- verdicts --------------------------------------------------------------------

    def judge(self, faults: list[Fault], repaired: float) -> None:
        """Recovery of each fault from the samples: the last time an affected VM went
        from not-ok to ok. VMs disrupted but on no failed host count for the faults of
        the group that hit no host (a leader kill that stopped a VM is that kill's)."""
        if not faults:
            return
        start = min(f.started_at for f in faults)
        samples = self.checker.since(start)
        on_hosts = set().union(*(f.affected for f in faults if f.kind in HOST_KINDS))
        disrupted: set[str] = set()
        for s in samples:
            where = s.where()
            disrupted |= {k for k in self.created - self.poison if not vm_ok(k, where, s.records)}
        for fault in faults:
            if fault.kind not in HOST_KINDS and fault.kind != "poison_vm":
                fault.affected |= disrupted - on_hosts
            # Time during which a blocking fault held the control plane down, plus the
            # session TTL a coordinator takes to lead again, is added to the budget.
            fault.budget_s += self.blocked_s(fault, time.time())
            held = fault.early_repair_at is None
            window_end = (fault.repaired_at or repaired) if held else (fault.ended_at or repaired)
            window = [s for s in samples if fault.started_at <= s.at <= window_end]
            fault.recovery_s = recovery_s(fault, window, held)
            if fault.recovery_s is None:
                fault.late = True
                fault.detail = fault.detail or "never recovered in its window"
            elif fault.recovery_s > fault.budget_s:
                fault.late = True
                fault.detail = f"{fault.recovery_s:.1f}s > {fault.budget_s:.1f}s " + fault.detail
            self.report.faults.append(fault)

    def describe(self, episode: Episode) -> str:
        """The episode, its length and the faults under way when it began."""
        during = [
            f"{f.index} {f.kind} {f.target}".rstrip()
            for f in self.report.faults
            if f.started_at <= episode.first_at <= (f.ended_at or time.time())
        ]
        return (
            f"{episode.detail} for {episode.last_at - episode.first_at + self.checker.interval:.1f}s"
            f" ({episode.samples} samples from t+{episode.first_at - self.t0:.1f}s),"
            f" during fault {', '.join(during) or 'none'}"
        )

    def finish(self) -> None:
        """Invariants over every sample, and no VM lost at the end."""
        report = self.report
        findings = self.checker.findings
        report.duplicates = [self.describe(e) for e in findings.episodes if e.kind == "duplicate"]
        report.violations = [self.describe(e) for e in findings.episodes if e.kind == "violation"]
        sample = self.checker.latest()
        records = sample.records if sample is not None else None
        if sample is None or records is None:
            report.lost = sorted(self.created)
        else:
            where = sample.where()
            report.lost = sorted(
                f"{k}: " + ("record gone" if k not in records.vms else "not running, no reason")
                for k in self.created
                if k not in records.vms or not vm_ok(k, where, records)
            )
        times = [s.at for s in self.checker.samples]
        report.samples = len(times)
        report.max_gap_s = max((b - a for a, b in itertools.pairwise(times)), default=0)


def recovery_s(fault: Fault, window: Sequence[Sample], held: bool) -> float | None:
    """Seconds from the fault to the last time one of its VMs went from not ok to ok in
    `window` (0: none was ever disrupted; None: not ok at the window's end). A held host
    fault also wants its VMs off the failed host."""
    if not fault.affected:
        return 0.0
    last_bad: int | None = None
    for i, s in enumerate(window):
        where = s.where()
        bad = any(not vm_ok(k, where, s.records) for k in fault.affected)
        if held and fault.kind in HOST_KINDS:
            bad = bad or any(fault.target in where.get(k, ()) for k in fault.affected)
        if bad:
            last_bad = i
    if last_bad is None:
        return 0.0
    if last_bad + 1 >= len(window):
        return None
    return window[last_bad + 1].at - fault.started_at


def run_campaign(
    faults: int,
    seed: int,
    mode: str,
    hosts: int = 4,
    kinds: Sequence[str] | None = None,
    lease_ttl: float | None = None,
    max_time_s: float | None = None,
    state_dir: Path | None = None,
    out: TextIO | None = None,
) -> Report:
    """Start a lab of its own, run the campaign, take the lab down; the report says all."""
    out = out if out is not None else sys.stderr
    chosen = list(
        kinds if kinds is not None else (PASSING_REAL if mode == "real" else PASSING_TEST)
    )
    unknown = [k for k in chosen if k not in KINDS]
    if unknown:
        raise ChaosError(f"unknown fault kinds {unknown}; kinds: {', '.join(KINDS)}")
    if mode != "real":
        chosen = [k for k in chosen if k not in REAL_ONLY]
    if not chosen:
        raise ChaosError("no fault kind left to inject")
    if faults < 1:
        raise ChaosError("--faults must be at least 1")
    made_dir = state_dir is None
    base = Path(tempfile.mkdtemp(prefix="hvplace-chaos-")) if state_dir is None else state_dir
    lab = Lab(scratch_settings(base / "lab", prefix="hvc"), out=out)
    rng = random.Random(seed)
    report = Report(seed=seed, mode=mode)
    print(
        f"== chaos: {faults} faults, seed {seed}, {mode} lab of {hosts} hosts, kinds {chosen}",
        file=out,
        flush=True,
    )
    final_state = None
    try:
        lab.up(hosts, mode, lease_ttl, etcd_members=ETCD_MEMBERS)
        checker = Checker(lab.etcd_endpoint(), lab.state)
        with checker:
            campaign = Campaign(
                lab, checker, rng, chosen, out, max_time_s or 120.0 + 90.0 * faults, report
            )
            try:
                campaign.setup()
                campaign.run(faults)
            except (LabError, WorkloadError, DaemonError, HostError, ChaosError) as exc:
                report.problems.append(f"campaign stopped: {exc}")
                print(f"!! campaign stopped: {exc}", file=out, flush=True)
            campaign.finish()
        final_state = lab.state()
    finally:
        if final_state is None and lab.settings.state_file.exists():
            with contextlib.suppress(Exception):
                final_state = lab.state()
        problems = lab.down()
        report.leftovers += problems
        if final_state is not None:
            report.leftovers += leftovers(final_state, lab.settings.state_dir)
        if made_dir:
            shutil.rmtree(base, ignore_errors=True)
    return report


def print_report(report: Report, out: TextIO) -> None:
    print(report.table(), file=out)
    print(json.dumps(report.summary(), sort_keys=True), file=out, flush=True)
