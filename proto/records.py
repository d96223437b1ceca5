"""Domain records: frozen dataclasses the engine computes on and etcd stores as JSON.

Each record has a twin message in `hvplace.proto` with the same field names; codec.py
writes that message's JSON mapping (a test keeps the two in step). Label selectors are
in selectors.py, checks of names and sizes in validation.py, the timing budget in timing.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from hvplace.proto.selectors import LabelSelector, NodeAffinity
from hvplace.proto.timing import watchdog_timeout_for

TOPOLOGY_HOST = "host"
"""The topology key of a single host; any other key names a host label (rack, zone...)."""


class HostState(StrEnum):
    READY = "ready"
    CORDONED = "cordoned"
    DRAINING = "draining"
    DRAINED = "drained"  # drain finished: nothing runs here; `uncordon` returns it to service
    LOST = "lost"
    # Derived, never written: registered, but its agent cannot use libvirt
    # (HostInfo.hypervisor_error). Takes nothing new; its VMs are not moved.
    DEGRADED = "degraded"


class HAPriority(StrEnum):
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    OFF = "off"

    @property
    def rank(self) -> int:
        """Order of re-placement after a failure: 0 first; `off` is never re-placed."""
        return _HA_RANK[self]


_HA_RANK = {HAPriority.HIGH: 0, HAPriority.MEDIUM: 1, HAPriority.LOW: 2, HAPriority.OFF: 3}


class Power(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"


class Phase(StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


class RuleKind(StrEnum):
    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti_affinity"


class Enforcement(StrEnum):
    REQUIRED = "required"
    PREFERRED = "preferred"


class OnFailure(StrEnum):
    BLOCK = "block"
    DEGRADE = "degrade"


class DomainState(StrEnum):
    """A managed domain's state as its agent reports it."""

    DEFINED = "defined"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"
    FAILED = "failed"
    FENCED = "fenced"


class MigrationPolicy(StrEnum):
    """How a VM leaves a host for maintenance (drain, rebalance)."""

    LIVE = "live"  # live migration only: a VM that cannot move live stays
    LIVE_OR_RESTART = "live_or_restart"  # live, else a cold restart elsewhere
    RESTART = "restart"  # always a cold restart elsewhere (e.g. local state not worth copying)


class AdmissionPolicy(StrEnum):
    REFUSE = "refuse"
    WARN = "warn"


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True, slots=True)
class Resources:
    vcpus: int = 0
    memory_mib: int = 0
    disk_gib: int = 0


@dataclass(frozen=True, slots=True)
class Ratios:
    """Allocation (overcommit) ratios, as Nova's cpu/ram/disk_allocation_ratio."""

    cpu: float = 1.0
    ram: float = 1.0
    disk: float = 1.0


# --------------------------------------------------------------------------- hosts


@dataclass(frozen=True, slots=True)
class HostInfo:
    """A host's registration, written by its agent under the agent's lease."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: Resources = Resources()
    ratios: Ratios = Ratios()
    reserved_memory_mib: int = 0
    address: str = ""
    libvirt_uri: str = ""
    domain_type: str = ""
    agent_version: str = ""
    started_at: float = 0.0
    # Why the agent cannot use libvirt ("" while it can): the host is then `degraded`.
    hypervisor_error: str = ""
    hypervisor_error_since: float = 0.0
    # Live migration: the libvirt URI other hosts' libvirtds dial to send a guest here
    # ("" : this host takes no live migrations), and where its console logs live.
    migration_uri: str = ""
    console_dir: str = ""


@dataclass(frozen=True, slots=True)
class HostStatus:
    """A host's administrative state, written by the coordinator (cordon, drain, lost)."""

    name: str
    state: HostState = HostState.READY
    reason: str = ""
    since: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)
    """Labels an operator set (`hvplace host label`); they override the agent's."""


def host_labels(info: HostInfo, status: HostStatus | None) -> Mapping[str, str]:
    """A host's labels: its agent's, with those an operator set over them."""
    if status is None or not status.labels:
        return info.labels
    return {**info.labels, **status.labels}


def host_state(info: HostInfo | None, status: HostStatus | None) -> HostState:
    """A registered host's state from its records: the coordinator's status, except that a
    ready host whose agent reports libvirt unusable is `degraded` (derived each time)."""
    state = status.state if status is not None else HostState.READY
    if state is HostState.READY and info is not None and info.hypervisor_error:
        return HostState.DEGRADED
    return state


@dataclass(frozen=True, slots=True)
class Host:
    """The engine's view of a host: registration plus state."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: Resources = Resources()
    ratios: Ratios = Ratios()
    reserved_memory_mib: int = 0
    state: HostState = HostState.READY

    @classmethod
    def from_records(cls, info: HostInfo, status: HostStatus | None) -> Host:
        return cls(
            name=info.name,
            labels=host_labels(info, status),
            capacity=info.capacity,
            ratios=info.ratios,
            reserved_memory_mib=info.reserved_memory_mib,
            state=host_state(info, status),
        )

    def allocatable(self) -> Resources:
        """What VMs may use: vCPU × ratio, memory × ratio − reserved, disk × ratio."""
        cap, r = self.capacity, self.ratios
        return Resources(
            vcpus=math.floor(cap.vcpus * r.cpu),
            memory_mib=max(0, math.floor(cap.memory_mib * r.ram) - self.reserved_memory_mib),
            disk_gib=math.floor(cap.disk_gib * r.disk),
        )

    def topology(self, key: str) -> str | None:
        """The host's domain for a topology key, or None when the host lacks that label."""
        if key == TOPOLOGY_HOST:
            return self.name
        return self.labels.get(key)

    def label(self, key: str) -> str | None:
        """A label for node affinity; the key `host` means the host's name."""
        if key == TOPOLOGY_HOST:
            return self.name
        return self.labels.get(key)


# --------------------------------------------------------------------------- VMs


@dataclass(frozen=True, slots=True)
class Image:
    """Direct kernel boot (kernel, initrd, cmdline) or a base disk image for a qcow2 overlay.

    Without `name`: absolute host paths (under the cluster's image_roots, when set). With
    `name`: a catalogue image (/hvplace/v1/images/<name>), its files relative to each
    host's image directories with their sha256; a VM created with only the name gets the
    catalogue's files and digests copied in (so its agent needs nothing else)."""

    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    disk: str = ""
    name: str = ""
    kernel_sha256: str = ""
    initrd_sha256: str = ""
    disk_sha256: str = ""

    @property
    def is_reference(self) -> bool:
        """Only a catalogue image's name, to be resolved at create."""
        return bool(self.name) and self == Image(name=self.name)


@dataclass(frozen=True, slots=True)
class VM:
    scope: str
    name: str
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = Resources(vcpus=1, memory_mib=64, disk_gib=0)
    image: Image = Image()
    node_affinity: NodeAffinity = NodeAffinity()
    ha_priority: HAPriority = HAPriority.MEDIUM
    power: Power = Power.RUNNING
    description: str = ""
    request_id: str = ""
    created_at: float = 0.0
    migration: MigrationPolicy = MigrationPolicy.LIVE

    @property
    def key(self) -> str:
        return vm_key(self.scope, self.name)


def vm_key(scope: str, name: str) -> str:
    """The identity of a VM across the cluster, and its etcd key suffix."""
    return f"{scope}/{name}"


@dataclass(frozen=True, slots=True)
class Assignment:
    """A VM bound to a host. `epoch` grows on every move, so a returning host can tell
    its stale domains from current ones. The spec is carried so the agent needs no
    other record to run the VM."""

    vm: VM
    host: str
    epoch: int
    # A live migration's commit: the running domain tagged with this (the source's)
    # epoch is this assignment's guest, re-tagged in place, never re-created.
    adopt_epoch: int = 0


@dataclass(frozen=True, slots=True)
class ReasonCount:
    """One group of hosts rejected for the same reason."""

    code: str
    message: str
    hosts: int
    rule: str = ""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a VM is pending: per reason, how many hosts it rejected."""

    vm: str
    total_hosts: int
    feasible_hosts: int
    reasons: tuple[ReasonCount, ...] = ()

    def summary(self) -> str:
        parts = ", ".join(f"{r.hosts} {r.message}" for r in self.reasons)
        head = f"{self.feasible_hosts}/{self.total_hosts} hosts"
        return f"{head}: {parts}" if parts else head


@dataclass(frozen=True, slots=True)
class StartFailure:
    """One host on which the VM's assignment (at `epoch`) could not be defined or started."""

    host: str
    epoch: int = 0
    reason: str = ""
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class VMStatus:
    """Where a VM stands, written by the coordinator (placement) and read by the API.

    `start_failures` are the hosts it failed to start on in a row (cleared once it runs,
    or by `vm start`); at the cluster's `max_start_attempts` it stays `failed`."""

    scope: str
    name: str
    phase: Phase = Phase.PENDING
    reason: str = ""
    host: str = ""
    epoch: int = 0
    since: float = 0.0
    degraded: tuple[str, ...] = ()
    explanation: Explanation | None = None
    start_failures: tuple[StartFailure, ...] = ()


@dataclass(frozen=True, slots=True)
class DomainStatus:
    """A managed domain as its agent sees it, written under the agent's own keys."""

    scope: str
    name: str
    host: str
    uid: str = ""
    epoch: int = 0
    state: DomainState = DomainState.DEFINED
    since: float = 0.0
    last_error: str = ""
    # The source agent's account of a live migration of this domain.
    migrating_to: str = ""
    migrated_to: str = ""
    migration_error: str = ""
    migration_started_at: float = 0.0  # which record (its started_at) the three report on


@dataclass(frozen=True, slots=True)
class Migration:
    """A live migration in flight, written by the coordinator under both hosts' keys
    (keyspace.migration). The target's share counts as a reservation in placement from
    the record's creation to its deletion; the source agent runs the libvirt job."""

    scope: str
    name: str
    uid: str
    source: str
    target: str
    epoch: int
    target_uri: str = ""
    target_address: str = ""
    target_console_dir: str = ""
    started_at: float = 0.0
    timeout_s: float = 0.0
    # A cold move (restart): the source's assignment is gone from the start; the guest is
    # started on the target once the source reports it stopped.
    restart: bool = False

    @property
    def key(self) -> str:
        return f"{self.scope}/{self.name}"


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Rule:
    """Affinity or anti-affinity between VMs of one scope (SPEC §1).

    Members are explicit names and/or a label selector. `max_per_domain` bounds how many
    members share one topology domain (anti-affinity); `min_domains` asks that members
    cover at least min(min_domains, members) domains, balanced.
    """

    scope: str
    name: str
    kind: RuleKind
    enforcement: Enforcement = Enforcement.REQUIRED
    weight: int = 0
    members: tuple[str, ...] = ()
    selector: LabelSelector | None = None
    topology_key: str = TOPOLOGY_HOST
    max_per_domain: int = 1
    min_domains: int = 0
    on_failure: OnFailure = OnFailure.BLOCK
    description: str = ""
    created_at: float = 0.0
    max_members: int = 0
    """0: no cap; otherwise the member that would make one more is refused."""

    @property
    def key(self) -> str:
        return f"{self.scope}/{self.name}"

    @property
    def required(self) -> bool:
        return self.enforcement is Enforcement.REQUIRED

    def selects(self, vm: VM) -> bool:
        if vm.scope != self.scope:
            return False
        if vm.name in self.members:
            return True
        return self.selector is not None and self.selector.matches(vm.labels)


@dataclass(frozen=True, slots=True)
class ScopePolicy:
    """G8's cloudspace label anti-affinity (seeds/000) for one scope.

    With `label_anti_affinity`, VMs of the scope that share a label (a key=value pair,
    restricted to `label_keys` when given) never share a host. With `spread` s > 0 they
    may, but cover at least min(s, k) hosts, balanced.
    """

    scope: str
    label_anti_affinity: bool = False
    spread: int = 0
    label_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Cluster-wide settings every daemon reads (the timing budget and admission policy)."""

    lease_ttl_s: float = 5.0
    fence_after_s: float = 3.0
    failover_delay_s: float = 0.5
    admission_policy: AdmissionPolicy = AdmissionPolicy.WARN
    admission_failures: int = 1
    admission_topology: str = TOPOLOGY_HOST
    default_image: Image | None = None
    """The image a VM created without one boots from; without it such a VM is refused."""
    image_roots: tuple[str, ...] = ()
    """When set, every image path must lie under one of these directories (the image
    store); unset, any plain absolute path outside the system trees is taken."""
    max_start_attempts: int = 3
    """Hosts a VM may fail to start on in a row before it stays `failed` (vSphere's
    restart count); `hvplace vm start` clears the count."""
    # The longest a host's watchdog may run unpetted before it resets the host: a dead
    # or hung agent's guests end at most fence_after_s + this after its last renewal.
    # 0 (and records written before it existed): the largest safe value, `watchdog_s`.
    watchdog_timeout_s: float = 0.0

    @property
    def watchdog_s(self) -> float:
        """The watchdog timeout in force."""
        return self.watchdog_timeout_s or watchdog_timeout_for(
            self.lease_ttl_s, self.fence_after_s, self.failover_delay_s
        )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """An idempotency record: a retried create with the same id returns the same result."""

    request_id: str
    kind: str
    targets: tuple[str, ...] = ()
    fingerprint: str = ""
    created_at: float = 0.0
