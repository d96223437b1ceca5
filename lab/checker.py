"""The fault campaign's independent checker: where VMs really run, every 100 ms, and the
invariants (no VM on two hosts, no required rule broken) over every sample.

Independent of hvplace's code paths: it imports neither the agent nor the coordinator nor
the record codecs (an import-linter contract keeps it so), reads etcd's raw JSON through
its gateway, and sees real hosts through their QEMU processes and their own libvirtd
(`virsh`). Hosts on libvirt's test:/// driver keep their domains inside the agent
process, so for them it reads what the agents report in etcd, counting a host whose
agent process is dead as running nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hvplace.lab.observe import Endpoint, ObserveError, read_prefix
from hvplace.lab.processes import is_alive, namespace_inode, pid_alive, pids_in_namespace
from hvplace.lab.state import HostRecord, LabState

ROOT = "/hvplace/v1/"
SAMPLE_INTERVAL_S = 0.1


def domain_name(scope: str, name: str) -> str:
    """The libvirt name hvplace gives a VM's domain (`hv-<scope>.<name>-<sha256[:8]>`),
    written out again here rather than imported, so the checker shares no code with the
    agent; a test pins it to the agent's."""
    digest = hashlib.sha256(f"{scope}/{name}".encode()).hexdigest()[:8]
    return f"hv-{scope}.{name}-{digest}"


# -- records, decoded from etcd's JSON by the checker itself -------------------------


@dataclass(frozen=True)
class VMView:
    key: str
    scope: str
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class RuleView:
    """A required anti-affinity rule (on_failure block): the only kind never broken."""

    key: str
    scope: str
    members: frozenset[str]
    match_labels: Mapping[str, str]
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...]
    topology_key: str
    max_per_domain: int

    def selects(self, vm: VMView) -> bool:
        if vm.scope != self.scope:
            return False
        if vm.name in self.members:
            return True
        if not self.match_labels and not self.expressions:
            return False
        if any(vm.labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        return all(_expression(vm.labels.get(k), op, vs) for k, op, vs in self.expressions)


def _expression(value: str | None, op: str, values: tuple[str, ...]) -> bool:
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    try:
        number, bound = int(value or ""), int(values[0])
    except (ValueError, IndexError):
        return False
    return number > bound if op == "Gt" else number < bound


@dataclass(frozen=True)
class PolicyView:
    """A scope's label anti-affinity without spread: same-label VMs never share a host."""

    scope: str
    label_keys: frozenset[str]


@dataclass(frozen=True)
class StatusView:
    phase: str
    reason: str
    host: str


@dataclass
class Records:
    """One read of everything under /hvplace/v1/, as plain data."""

    at: float
    vms: dict[str, VMView] = field(default_factory=dict)
    rules: list[RuleView] = field(default_factory=list)
    policies: list[PolicyView] = field(default_factory=list)
    status: dict[str, StatusView] = field(default_factory=dict)
    host_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    assigned: dict[str, list[str]] = field(default_factory=dict)  # VM -> hosts
    reported: dict[str, set[str]] = field(default_factory=dict)  # host -> VMs it reports running
    lease_ttl_s: float = 5.0
    failover_delay_s: float = 0.5
    candidates: int = 0  # keys under election/: a leader exists when there is one

    @property
    def registered(self) -> set[str]:
        return set(self.host_labels)


def parse_records(kvs: Mapping[str, bytes], at: float) -> Records:
    out = Records(at=at)
    for key, raw in kvs.items():
        rest = key.removeprefix(ROOT)
        kind, _, path = rest.partition("/")
        if kind == "election":
            out.candidates += 1
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if kind == "vms" and isinstance(value, dict):
            scope, name = str(value["scope"]), str(value["name"])
            labels = {str(k): str(v) for k, v in value.get("labels", {}).items()}
            out.vms[f"{scope}/{name}"] = VMView(f"{scope}/{name}", scope, name, labels)
        elif kind == "vmstatus" and isinstance(value, dict):
            out.status[path] = StatusView(
                phase=str(value.get("phase", "pending")),
                reason=str(value.get("reason", "")),
                host=str(value.get("host", "")),
            )
        elif kind == "hosts" and isinstance(value, dict):
            out.host_labels[path] = {str(k): str(v) for k, v in value.get("labels", {}).items()}
        elif kind == "assignments":
            host, _, vm = path.partition("/")
            out.assigned.setdefault(vm, []).append(host)
        elif kind == "domains" and isinstance(value, dict):
            host, _, vm = path.partition("/")
            if value.get("state") == "running":
                out.reported.setdefault(host, set()).add(vm)
        elif kind == "rules" and isinstance(value, dict):
            rule = _rule(value)
            if rule is not None:
                out.rules.append(rule)
        elif kind == "policies" and isinstance(value, dict):
            if value.get("label_anti_affinity") and not value.get("spread"):
                keys = frozenset(str(k) for k in value.get("label_keys", []))
                out.policies.append(PolicyView(str(value["scope"]), keys))
        elif kind == "config" and isinstance(value, dict):
            out.lease_ttl_s = float(value.get("lease_ttl_s", out.lease_ttl_s))
            out.failover_delay_s = float(value.get("failover_delay_s", out.failover_delay_s))
    return out


def _rule(value: Mapping[str, object]) -> RuleView | None:
    if value.get("kind") != "anti_affinity":
        return None
    if value.get("enforcement", "required") != "required":
        return None
    if value.get("on_failure", "block") != "block":
        return None  # degrade: may be broken on failover, by design (recorded on the VM)
    selector = value.get("selector") or {}
    assert isinstance(selector, dict)
    expressions = tuple(
        (str(e["key"]), str(e["operator"]), tuple(str(v) for v in e.get("values", [])))
        for e in selector.get("match_expressions", [])
    )
    members = value.get("members", [])
    assert isinstance(members, list)
    scope, name = str(value["scope"]), str(value["name"])
    return RuleView(
        key=f"{scope}/{name}",
        scope=scope,
        members=frozenset(str(m) for m in members),
        match_labels={str(k): str(v) for k, v in selector.get("match_labels", {}).items()},
        expressions=expressions,
        topology_key=str(value.get("topology_key", "host")),
        max_per_domain=int(str(value.get("max_per_domain", 1))),
    )


def read_records(endpoint: Endpoint) -> Records:
    # Short: a sample that waits on a dead etcd is a gap in the evidence.
    _revision, kvs = read_prefix(endpoint, ROOT, timeout=0.5)
    return parse_records(kvs, time.time())


# -- the invariants over one sample (pure) --------------------------------------------

Where = Mapping[str, Iterable[str]]  # VM key -> hosts it is active on


def duplicates(where: Where) -> list[tuple[str, str]]:
    """(VM, detail) for every VM active on more than one host."""
    return [
        (vm, f"{vm} active on {', '.join(sorted(hosts))}")
        for vm, hosts in sorted(where.items())
        if len(set(hosts)) > 1
    ]


def rule_violations(
    where: Where, records: Records, host_labels: Mapping[str, Mapping[str, str]]
) -> list[tuple[str, str]]:
    """(rule, detail) for every required rule the active VMs break: more members of an
    anti-affinity rule in one topology domain than max_per_domain, or two VMs of a scope
    with label anti-affinity (no spread) sharing a label on one host. A VM active on two
    hosts counts in both."""
    found: list[tuple[str, str]] = []
    for rule in records.rules:
        per_domain: dict[str, set[str]] = {}
        for key, hosts in where.items():
            vm = records.vms.get(key)
            if vm is None or not rule.selects(vm):
                continue
            for host in hosts:
                domain = (
                    host
                    if rule.topology_key == "host"
                    else host_labels.get(host, {}).get(rule.topology_key, "")
                )
                if domain:
                    per_domain.setdefault(domain, set()).add(key)
        for domain, members in sorted(per_domain.items()):
            if len(members) > rule.max_per_domain:
                found.append(
                    (
                        f"rule {rule.key}",
                        f"rule {rule.key}: {len(members)} members in {rule.topology_key}"
                        f" {domain} (max {rule.max_per_domain}): {', '.join(sorted(members))}",
                    )
                )
    for policy in records.policies:
        per_label: dict[tuple[str, str, str], set[str]] = {}
        for key, hosts in where.items():
            vm = records.vms.get(key)
            if vm is None or vm.scope != policy.scope:
                continue
            for label, value in vm.labels.items():
                if policy.label_keys and label not in policy.label_keys:
                    continue
                for host in hosts:
                    per_label.setdefault((host, label, value), set()).add(key)
        for (host, label, value), members in sorted(per_label.items()):
            if len(members) > 1:
                found.append(
                    (
                        f"policy {policy.scope}",
                        f"policy {policy.scope}: {label}={value} twice on {host}:"
                        f" {', '.join(sorted(members))}",
                    )
                )
    return found


def vm_ok(key: str, where: Where, records: Records | None) -> bool:
    """Running on exactly one host, or not running and pending/failed with a reason (with
    etcd unreadable, running once is all that can be known)."""
    hosts = set(where.get(key, ()))
    if len(hosts) == 1:
        return True
    status = records.status.get(key) if records is not None else None
    return (
        not hosts
        and status is not None
        and status.phase in ("pending", "failed")
        and bool(status.reason)
    )


# -- where VMs run: the samplers --------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    running: Mapping[str, frozenset[str]]  # host -> VM keys active there
    unreachable: frozenset[str]  # hosts whose libvirtd did not answer (QEMU still seen)
    records: Records | None  # None: etcd did not answer

    def where(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for host, keys in sorted(self.running.items()):
            for key in keys:
                out.setdefault(key, []).append(host)
        return out


class Virsh:
    """One `virsh` shell kept open on a host's libvirtd: a fork per sample would take a
    core at 10 samples a second per host. Reconnects by itself after libvirtd restarts."""

    MARK = "__hvplace_checker__"

    RETRY_S = 1.0

    def __init__(self, uri: str, timeout: float = 0.5) -> None:
        self.uri = uri
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._retry_at = 0.0

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["virsh", "-q", "-c", self.uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._proc = proc
        return proc

    def active(self) -> list[str] | None:
        """Names of the active domains, None when libvirtd did not answer (after a failure
        it is asked again only a second later: the QEMU processes still show what runs)."""
        if time.monotonic() < self._retry_at:
            return None
        listed = self._active()
        if listed is None:
            self._retry_at = time.monotonic() + self.RETRY_S
        return listed

    def _active(self) -> list[str] | None:
        proc = self._proc if self._proc is not None and self._proc.poll() is None else None
        proc = proc or self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(f"list --name\necho {self.MARK}\n".encode())
            proc.stdin.flush()
        except OSError:
            self.close()
            return None
        out = b""
        deadline = time.monotonic() + self.timeout
        fd = proc.stdout.fileno()
        # The echoed command reads "virsh # echo MARK": only the output starts a line.
        mark = f"\n{self.MARK}".encode()
        while mark not in out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.close()
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self.close()
                return None
            out += chunk
        lines = [line.strip() for line in out.decode(errors="replace").splitlines()]
        if any("error:" in line and "Reconnected" not in line for line in lines):
            return None
        return [line for line in lines if line.startswith("hv-")]

    def close(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._proc = None


def qemu_guests(netns_inodes: Mapping[int, str]) -> dict[str, set[str]]:
    """host -> libvirt names of the QEMU processes in that host's network namespace,
    from /proc: what runs whatever libvirtd (dead or alive) says."""
    found: dict[str, set[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        inode = namespace_inode(f"/proc/{entry}/ns/net")
        host = netns_inodes.get(inode) if inode is not None else None
        if host is None:
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or b"qemu" not in Path(argv[0].decode(errors="replace")).name.encode():
            continue
        name = _qemu_name(argv)
        if name and pid_alive(int(entry)):
            found.setdefault(host, set()).add(name)
    return found


def _qemu_name(argv: list[bytes]) -> str:
    for flag, value in itertools.pairwise(argv):
        if flag == b"-name":
            text = value.decode(errors="replace")
            for part in text.split(","):
                if part.startswith("guest="):
                    return part.removeprefix("guest=")
            return text.split(",")[0]
    return ""


class Checker:
    """Samples every host every 100 ms in a thread and checks every sample at once."""

    def __init__(
        self,
        endpoint: Endpoint,
        lab_state: Callable[[], LabState],
        interval: float = SAMPLE_INTERVAL_S,
    ) -> None:
        self.endpoint = endpoint
        self.lab_state = lab_state
        self.interval = interval
        self.samples: list[Sample] = []
        self.findings = Findings()
        self.names: dict[str, str] = {}  # libvirt name -> VM key, of every VM ever seen
        self.host_labels: dict[str, dict[str, str]] = {}  # kept after a host deregisters
        self.records: Records | None = None
        self._virsh: dict[str, Virsh] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="checker-virsh")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)
        for session in self._virsh.values():
            session.close()
        self._virsh.clear()

    def __enter__(self) -> Checker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            sample = self.take()
            with self._lock:
                self.samples.append(sample)
                self.findings.check(sample, self.host_labels)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def latest(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def since(self, at: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.at >= at]

    def take(self) -> Sample:
        try:
            records: Records | None = read_records(self.endpoint)
        except ObserveError:
            records = None
        if records is not None:
            self.records = records
            for key, vm in records.vms.items():
                self.names.setdefault(domain_name(vm.scope, vm.name), key)
            for host, labels in records.host_labels.items():
                self.host_labels[host] = labels
        lab = self.lab_state()
        running: dict[str, frozenset[str]] = {}
        unreachable: set[str] = set()
        real = {h.name: h for h in lab.hosts.values() if h.mode == "real"}
        if real:
            inodes = {h.netns_inode: h.name for h in real.values() if h.netns_inode is not None}
            # Every host's libvirtd at once: one slow host must not stretch the sample.
            asked = {name: self._pool.submit(self._virsh_of(h).active) for name, h in real.items()}
            procs = qemu_guests(inodes)
            for name in real:
                listed = asked[name].result()
                if listed is None:
                    unreachable.add(name)
                names = set(listed or ()) | procs.get(name, set())
                running[name] = frozenset(self._key(n) for n in names)
        reports = self.records.reported if self.records is not None else {}
        for test_host in lab.hosts.values():
            if test_host.mode == "real":
                continue
            reported = reports.get(test_host.name, set())
            # A dead agent's test:/// domains died with it (its lease outlives it).
            alive = is_alive(test_host.agent)
            running[test_host.name] = frozenset(reported) if alive else frozenset()
            if records is None:
                unreachable.add(test_host.name)
        return Sample(time.time(), running, frozenset(unreachable), records)

    def _key(self, name: str) -> str:
        return self.names.get(name, f"?{name}")

    def _virsh_of(self, host: HostRecord) -> Virsh:
        session = self._virsh.get(host.name)
        if session is None:
            session = self._virsh[host.name] = Virsh(host.root_side_uri)
        return session


@dataclass
class Episode:
    """One invariant broken over consecutive samples."""

    kind: str  # "duplicate" or "violation"
    subject: str
    first_at: float
    last_at: float
    samples: int
    detail: str


class Findings:
    """Broken invariants, grouped into episodes (the same subject in consecutive samples)."""

    def __init__(self) -> None:
        self.episodes: list[Episode] = []
        self._open: dict[tuple[str, str], Episode] = {}

    def check(self, sample: Sample, host_labels: Mapping[str, Mapping[str, str]]) -> None:
        where = sample.where()
        seen: list[tuple[str, str, str]] = [("duplicate", s, d) for s, d in duplicates(where)]
        if sample.records is not None:
            labels = dict(host_labels)
            labels.update(sample.records.host_labels)
            seen += [("violation", s, d) for s, d in rule_violations(where, sample.records, labels)]
        current: dict[tuple[str, str], Episode] = {}
        for kind, subject, detail in seen:
            episode = self._open.get((kind, subject))
            if episode is None:
                episode = Episode(kind, subject, sample.at, sample.at, 0, detail)
                self.episodes.append(episode)
            episode.last_at = sample.at
            episode.samples += 1
            current[(kind, subject)] = episode
        self._open = current

    def count(self, kind: str) -> int:
        return sum(1 for e in self.episodes if e.kind == kind)


def leftovers(state: LabState, state_dir: Path) -> list[str]:
    """What a `lab down` left behind of this lab: processes by recorded PID, QEMU in the
    hosts' network namespaces, the state dir."""
    left: list[str] = []
    records = [p for h in state.hosts.values() for p in h.processes()]
    records += [c.process for c in state.coordinators if c.process is not None]
    records += [state.etcd] if state.etcd is not None else []
    left += [f"{r.role} PID {r.pid} still running" for r in records if is_alive(r)]
    for host in state.hosts.values():
        if host.netns_inode is not None:
            pids = pids_in_namespace("net", host.netns_inode)
            if pids:
                left.append(f"host {host.name}: processes {pids} in its netns")
    if state_dir.exists():
        left.append(f"{state_dir} still exists")
    return left
