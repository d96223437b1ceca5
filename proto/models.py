"""Domain records: frozen dataclasses the engine computes on and etcd stores as JSON.

Each record has a twin message in `hvplace.proto` with the same field names; the JSON
written here is that message's JSON mapping (snake_case names, defaults omitted), so
`etcdctl get` shows it readably and `google.protobuf.json_format` parses it (a test
keeps the two in step). Validation of names and sizes lives in `validate_*` so that
nothing malformed reaches a key or a libvirt name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from hvplace.proto.errors import InvalidInput
from hvplace.proto.names import (
    check_cmdline,
    check_int,
    check_label,
    check_label_key,
    check_name,
    check_number,
    check_path,
    check_relative_path,
    check_selector_value,
    check_sha256,
    check_text,
    clip,
    is_under,
    quote,
)

TOPOLOGY_HOST = "host"
"""The topology key of a single host; any other key names a host label (rack, zone...)."""

# Bounds on sizes: positive and bounded (SPEC §6).
MAX_VCPUS = 1024
MAX_MEMORY_MIB = 16 * 1024 * 1024
MAX_DISK_GIB = 1024 * 1024
MAX_LABELS = 64
MAX_RULE_NAME = 40  # vCD limits a rule name to 40 characters (seeds/003).
MAX_MEMBERS = 10_000
MAX_DESCRIPTION = 1024
MAX_TERMS = 8
"""Required (OR-ed) and preferred node affinity terms, each."""
MAX_EXPRESSIONS = 16
"""Expressions in one selector or node affinity term."""
MAX_EXPRESSION_VALUES = 64
"""Values of one In / NotIn expression."""
MAX_IMAGE_ROOTS = 16
MAX_VM_BYTES = 8192
"""A VM spec as stored (compact JSON); a typical one is 300-500 bytes."""


class HostState(StrEnum):
    READY = "ready"
    CORDONED = "cordoned"
    DRAINING = "draining"
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


class Op(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"
    GT = "Gt"
    LT = "Lt"


class DomainState(StrEnum):
    """A managed domain's state as its agent reports it."""

    DEFINED = "defined"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"
    FAILED = "failed"
    FENCED = "fenced"


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


# --------------------------------------------------------------------------- selectors


@dataclass(frozen=True, slots=True)
class LabelExpression:
    key: str
    operator: Op
    values: tuple[str, ...] = ()

    def matches_value(self, value: str | None) -> bool:
        op = self.operator
        if op is Op.IN:
            return value is not None and value in self.values
        if op is Op.NOT_IN:
            return value is None or value not in self.values
        if op is Op.EXISTS:
            return value is not None
        if op is Op.DOES_NOT_EXIST:
            return value is None
        if value is None:
            return False
        try:
            number = int(value)
        except ValueError:
            return False
        bound = int(self.values[0])
        return number > bound if op is Op.GT else number < bound

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.matches_value(labels.get(self.key))

    def __str__(self) -> str:
        if self.operator in (Op.EXISTS, Op.DOES_NOT_EXIST):
            return f"{self.key} {self.operator.value}"
        return f"{self.key} {self.operator.value} ({', '.join(self.values)})"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """Kubernetes-style selector: all of match_labels and all expressions must hold."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[LabelExpression, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        return all(e.matches(labels) for e in self.match_expressions)

    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


@dataclass(frozen=True, slots=True)
class NodeSelectorTerm:
    """All expressions must hold (AND); a host label key `host` means the host name."""

    match_expressions: tuple[LabelExpression, ...] = ()

    def matches(self, host: Host) -> bool:
        return all(e.matches_value(host.label(e.key)) for e in self.match_expressions)


@dataclass(frozen=True, slots=True)
class PreferredTerm:
    weight: int
    term: NodeSelectorTerm


@dataclass(frozen=True, slots=True)
class NodeAffinity:
    """`required`: at least one term must match (OR). `preferred`: weights summed."""

    required: tuple[NodeSelectorTerm, ...] = ()
    preferred: tuple[PreferredTerm, ...] = ()

    def admits(self, host: Host) -> bool:
        return not self.required or any(t.matches(host) for t in self.required)

    def score(self, host: Host) -> int:
        return sum(p.weight for p in self.preferred if p.term.matches(host))


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


CLOCK_MARGIN_S = 0.5
"""How far the agents', etcd's and the coordinator's clocks may drift over a lease."""


def fence_after_for(lease_ttl_s: float, failover_delay_s: float = 0.5) -> float:
    """The default `fence_after_s` for a lease TTL: 60 % of it, and never so late that the
    budget (see validate_cluster_config) turns unsafe. 5 s -> 3 s, 2 s -> 1 s."""
    safe = lease_ttl_s + failover_delay_s - FENCE_GRACE_S - CLOCK_MARGIN_S
    return round(min(0.6 * lease_ttl_s, safe), 3)


def watchdog_timeout_for(
    lease_ttl_s: float, fence_after_s: float, failover_delay_s: float = 0.5
) -> float:
    """The longest safe `watchdog_timeout_s` for a budget (see validate_cluster_config), in
    whole seconds as kernel watchdogs count them when at least one. 5/3 s -> 2 s, 2/1 s -> 1 s."""
    safe = lease_ttl_s + failover_delay_s - fence_after_s - CLOCK_MARGIN_S
    return float(math.floor(safe + 1e-9)) if safe >= 1 else round(safe, 3)


# --------------------------------------------------------------------------- validation


def _check_labels(labels: Mapping[str, str], what: str) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"{what} has {len(labels)} labels; at most {MAX_LABELS}")
    for k, v in labels.items():
        check_label(k, v, f"{what} label")


def _check_expression(e: LabelExpression, what: str) -> None:
    check_label_key(e.key, f"{what} expression")
    about = f"{what}: `{e.key} {e.operator.value}`"
    if e.operator in (Op.IN, Op.NOT_IN):
        if not e.values:
            raise InvalidInput(f"{about} needs at least one value")
        if len(e.values) > MAX_EXPRESSION_VALUES:
            raise InvalidInput(
                f"{about} has {len(e.values)} values; at most {MAX_EXPRESSION_VALUES}"
            )
        for v in e.values:
            check_selector_value(v, about)
    elif e.operator in (Op.EXISTS, Op.DOES_NOT_EXIST):
        if e.values:
            raise InvalidInput(f"{about} takes no values")
    else:
        if len(e.values) != 1:
            raise InvalidInput(f"{about} takes exactly one value, got {len(e.values)}")
        check_number(e.values[0], about)


def _check_expressions(exprs: tuple[LabelExpression, ...], what: str) -> None:
    if len(exprs) > MAX_EXPRESSIONS:
        raise InvalidInput(f"{what} has {len(exprs)} expressions; at most {MAX_EXPRESSIONS}")
    for e in exprs:
        _check_expression(e, what)


def _check_selector(selector: LabelSelector, what: str) -> None:
    _check_labels(selector.match_labels, what)
    _check_expressions(selector.match_expressions, what)


def _check_node_affinity(affinity: NodeAffinity, what: str) -> None:
    for terms, kind in ((affinity.required, "required"), (affinity.preferred, "preferred")):
        if len(terms) > MAX_TERMS:
            raise InvalidInput(f"{what} has {len(terms)} {kind} terms; at most {MAX_TERMS}")
    for term in affinity.required:
        if not term.match_expressions:
            raise InvalidInput(f"{what}: a required node affinity term is empty")
        _check_expressions(term.match_expressions, f"{what} node affinity")
    for p in affinity.preferred:
        check_int(p.weight, f"{what} preferred node affinity weight", 1, 100)
        _check_expressions(p.term.match_expressions, f"{what} node affinity")


IMAGE_FILES = ("kernel", "initrd", "disk")


def validate_image(image: Image, what: str) -> Image:
    """Paths absolute and plain (relative, each with its sha256, for a catalogue image),
    the command line printable ASCII, all bounded; an initrd only with a kernel. Whether
    an image is given at all is the caller's rule."""
    if image.name:
        check_name(image.name, f"{what} image name")
    for field_name in IMAGE_FILES:
        path = getattr(image, field_name)
        digest = getattr(image, f"{field_name}_sha256")
        where = f"{what} image {field_name}"
        if image.name:
            if path:
                check_relative_path(path, where)
                if not digest:
                    raise InvalidInput(f"{where} {quote(path)} has no sha256")
            if digest:
                check_sha256(digest, f"{where} sha256")
                if not path:
                    raise InvalidInput(f"{where} has a sha256 but no file")
        else:
            if path:
                check_path(path, where)
            if digest:
                raise InvalidInput(f"{where} has a sha256, which only a catalogue image has")
    check_cmdline(image.cmdline, f"{what} image cmdline")
    if image.initrd and not image.kernel:
        raise InvalidInput(f"{what} image has an initrd but no kernel")
    return image


def validate_catalogue_image(image: Image) -> Image:
    """A catalogue record: named, with a kernel or a base disk, each file relative."""
    if not image.name:
        raise InvalidInput("an image needs a name")
    what = f"image {image.name!r}"
    validate_image(image, "catalogue")
    if not has_image(image):
        raise InvalidInput(f"{what} names neither a kernel nor a disk")
    if image.disk and image.kernel:
        raise InvalidInput(f"{what} names both a kernel and a disk; give one")
    return image


def check_image_roots(image: Image, roots: tuple[str, ...], what: str) -> Image:
    """With `roots`, each path of the image lies under one of them (a catalogue image's
    paths are relative to the hosts' image directories instead)."""
    if roots and not image.name:
        for field_name in ("kernel", "initrd", "disk"):
            path = getattr(image, field_name)
            if path and not any(is_under(path, r) for r in roots):
                raise InvalidInput(
                    f"{what} image {field_name} {quote(path)} is outside the cluster's image"
                    f" roots ({quote(', '.join(roots))})"
                )
    return image


def has_image(image: Image) -> bool:
    """A VM boots from a kernel or a base disk; an image with neither is no image."""
    return bool(image.kernel or image.disk)


def validate_vm(vm: VM) -> VM:
    """Raise InvalidInput naming the first problem; return the VM unchanged if sound.

    Every text that reaches libvirt XML is checked here (the agent runs the same check
    before it renders a domain), so XML 1.0 can carry it and libvirt accepts it."""
    check_name(vm.scope, "scope")
    check_name(vm.name, "VM name")
    what = f"VM {vm.name!r}"
    if vm.uid:
        check_name(vm.uid, f"{what} uid")
    if vm.request_id:
        check_name(vm.request_id, f"{what} request id")
    _check_labels(vm.labels, what)
    r = vm.resources
    check_int(r.vcpus, f"{what} vcpus", 1, MAX_VCPUS)
    check_int(r.memory_mib, f"{what} memory_mib", 1, MAX_MEMORY_MIB)
    check_int(r.disk_gib, f"{what} disk_gib", 0, MAX_DISK_GIB)
    check_text(vm.description, f"{what} description", MAX_DESCRIPTION)
    _check_node_affinity(vm.node_affinity, what)
    validate_image(vm.image, what)
    return vm


def _size_bound(vm: VM) -> int:
    """An upper bound of `len(dumps(vm))`: JSON escapes a character to at most 12 bytes
    (a surrogate pair), and each label, term, expression and value adds bounded syntax."""
    texts = [vm.scope, vm.name, vm.uid, vm.request_id, vm.description]
    texts += [vm.image.kernel, vm.image.initrd, vm.image.cmdline, vm.image.disk, vm.image.name]
    syntax_image = 3 * (64 + 20) if vm.image.name else 0  # the digests
    texts += vm.labels.keys()
    texts += vm.labels.values()
    syntax = 400 + syntax_image + 6 * len(vm.labels)
    terms = [*vm.node_affinity.required, *(p.term for p in vm.node_affinity.preferred)]
    for term in terms:
        syntax += 60
        for e in term.match_expressions:
            syntax += 60 + 3 * len(e.values)
            texts.append(e.key)
            texts += e.values
    return syntax + 12 * sum(map(len, texts))


def check_vm_size(vm: VM) -> VM:
    """The stored spec stays small: it is written twice per VM (spec and assignment) and a
    transaction carries up to 500 VMs within etcd's 16 MiB request limit."""
    if _size_bound(vm) <= MAX_VM_BYTES:
        return vm  # the common case, without encoding the record
    size = len(dumps(vm))
    if size > MAX_VM_BYTES:
        raise InvalidInput(
            f"VM {vm.name!r} spec is {size} bytes as stored; at most {MAX_VM_BYTES}: use fewer"
            " or shorter labels, node affinity terms or values"
        )
    return vm


def validate_rule(rule: Rule) -> Rule:
    """Checks that need no other record; conflicts with other rules are the engine's."""
    check_name(rule.scope, "scope")
    check_name(rule.name, "rule name")
    if len(rule.name) > MAX_RULE_NAME:
        raise InvalidInput(
            f"rule name {rule.name!r} is {len(rule.name)} characters; at most {MAX_RULE_NAME}"
        )
    what = f"rule {rule.name!r}"
    if rule.enforcement is Enforcement.PREFERRED:
        check_int(rule.weight, f"{what} weight", 1, 100)
    elif rule.weight:
        raise InvalidInput(f"{what}: weight applies only to preferred rules")
    if len(rule.members) > MAX_MEMBERS:
        raise InvalidInput(f"{what} has {len(rule.members)} members; at most {MAX_MEMBERS}")
    for m in rule.members:
        check_name(m, f"{what} member")
    if len(set(rule.members)) != len(rule.members):
        raise InvalidInput(f"{what} names a member twice")
    if rule.selector is not None:
        _check_selector(rule.selector, f"{what} selector")
    has_selector = rule.selector is not None and not rule.selector.is_empty()
    if not has_selector and len(rule.members) < 2:
        raise InvalidInput(
            f"{what} names {len(rule.members)} member(s); a rule needs at least"
            " two VMs or a label selector"
        )
    if rule.topology_key != TOPOLOGY_HOST:
        check_label_key(rule.topology_key, f"{what} topology")
    check_int(rule.max_per_domain, f"{what} max_per_domain", 1, MAX_MEMBERS)
    check_int(rule.min_domains, f"{what} min_domains", 0, MAX_MEMBERS)
    check_int(rule.max_members, f"{what} max_members", 0, MAX_MEMBERS)
    if rule.max_members and len(rule.members) > rule.max_members:
        raise InvalidInput(
            f"{what} names {len(rule.members)} members; its max_members is {rule.max_members}"
        )
    if rule.kind is RuleKind.AFFINITY and (rule.max_per_domain != 1 or rule.min_domains):
        raise InvalidInput(f"{what}: max_per_domain and min_domains apply to anti_affinity only")
    check_text(rule.description, f"{what} description", MAX_DESCRIPTION)
    return rule


def validate_policy(policy: ScopePolicy) -> ScopePolicy:
    check_name(policy.scope, "scope")
    what = f"scope {policy.scope!r}"
    check_int(policy.spread, f"{what} spread", 0, MAX_MEMBERS)
    if len(policy.label_keys) > MAX_LABELS:
        raise InvalidInput(
            f"{what} policy names {len(policy.label_keys)} label keys; at most {MAX_LABELS}"
        )
    for k in policy.label_keys:
        check_label_key(k, f"{what} policy label")
    return policy


def validate_host_info(info: HostInfo) -> HostInfo:
    check_name(info.name, "host name")
    _check_labels(info.labels, f"host {info.name!r}")
    c = info.capacity
    check_int(c.vcpus, f"host {info.name!r} vcpus", 1, 1_000_000)
    check_int(c.memory_mib, f"host {info.name!r} memory_mib", 1, 1 << 40)
    check_int(c.disk_gib, f"host {info.name!r} disk_gib", 0, 1 << 40)
    for what, ratio in (
        ("cpu", info.ratios.cpu),
        ("ram", info.ratios.ram),
        ("disk", info.ratios.disk),
    ):
        if not (0 < ratio <= 64):
            raise InvalidInput(f"host {info.name!r} {what} ratio {ratio} must be in (0, 64]")
    check_int(info.reserved_memory_mib, f"host {info.name!r} reserved_memory_mib", 0, 1 << 40)
    return info


def validate_cluster_config(
    cfg: ClusterConfig, clock_margin_s: float = CLOCK_MARGIN_S
) -> ClusterConfig:
    """The fencing budget (SPEC §4, §5.6): a host's guests must be gone before the
    coordinator may re-place them, whether its agent is alive or not.

    The agent fences `fence_after_s` after its last acknowledged renewal; etcd expires the
    lease no earlier than `lease_ttl_s` after it; the coordinator re-places
    `failover_delay_s` after expiry. Destroying domains takes up to FENCE_GRACE_S, and
    clocks may drift by `clock_margin_s`. A dead or hung agent fences nothing: it pets the
    host's watchdog only while its last renewal is younger than `fence_after_s`, so the
    host resets at most `fence_after_s + watchdog_timeout_s` after that renewal.
    """
    if cfg.lease_ttl_s < 1 or cfg.lease_ttl_s > 600:
        raise InvalidInput(f"lease_ttl_s {cfg.lease_ttl_s} must be between 1 and 600 seconds")
    if cfg.fence_after_s <= 0:
        raise InvalidInput(f"fence_after_s {cfg.fence_after_s} must be positive")
    if cfg.failover_delay_s < 0:
        raise InvalidInput(f"failover_delay_s {cfg.failover_delay_s} must not be negative")
    slack = (
        cfg.lease_ttl_s
        + cfg.failover_delay_s
        - (cfg.fence_after_s + FENCE_GRACE_S + clock_margin_s)
    )
    if cfg.fence_after_s >= cfg.lease_ttl_s or slack < 0:
        raise InvalidInput(
            f"unsafe timing budget: fence_after_s {cfg.fence_after_s} + fence grace {FENCE_GRACE_S}"
            f" + clock margin {clock_margin_s} must not exceed lease_ttl_s {cfg.lease_ttl_s}"
            f" + failover_delay_s {cfg.failover_delay_s}, and fence_after_s must be below"
            " lease_ttl_s; lower fence_after_s or raise lease_ttl_s"
        )
    if not 0 <= cfg.watchdog_timeout_s <= 600:
        raise InvalidInput(
            f"watchdog_timeout_s {cfg.watchdog_timeout_s} must be between 0 (derived) and 600"
            " seconds"
        )
    reset_by = cfg.fence_after_s + cfg.watchdog_s + clock_margin_s
    if reset_by > cfg.lease_ttl_s + cfg.failover_delay_s + 1e-9:
        raise InvalidInput(
            f"unsafe timing budget: a dead agent's host resets up to fence_after_s"
            f" {cfg.fence_after_s} + watchdog_timeout_s {cfg.watchdog_s} + clock margin"
            f" {clock_margin_s} = {reset_by:g}s after its last renewal, later than the"
            f" {cfg.lease_ttl_s + cfg.failover_delay_s:g}s (lease_ttl_s + failover_delay_s)"
            " after which its VMs may be re-placed; lower watchdog_timeout_s to at most"
            f" {watchdog_timeout_for(cfg.lease_ttl_s, cfg.fence_after_s, cfg.failover_delay_s):g}"
            " or raise lease_ttl_s"
        )
    check_int(cfg.admission_failures, "admission_failures", 1, 16)
    if cfg.admission_topology != TOPOLOGY_HOST:
        check_label_key(cfg.admission_topology, "admission_topology")
    if len(cfg.image_roots) > MAX_IMAGE_ROOTS:
        raise InvalidInput(f"{len(cfg.image_roots)} image_roots; at most {MAX_IMAGE_ROOTS}")
    for root in cfg.image_roots:
        check_path(root, "image root")
    if cfg.default_image is not None:
        validate_image(cfg.default_image, "cluster default")
        if not has_image(cfg.default_image):
            raise InvalidInput("the cluster default image names neither a kernel nor a disk")
        check_image_roots(cfg.default_image, cfg.image_roots, "cluster default")
    check_int(cfg.max_start_attempts, "max_start_attempts", 1, 100)
    return cfg


FENCE_GRACE_S = 1.0
"""Time an agent is allowed to destroy its domains once it decides to fence."""


# --------------------------------------------------------------------------- JSON codec

T = TypeVar("T")
_Decoder = Callable[[Any], Any]
_Encoder = Callable[[Any], Any]
_plans: dict[type, tuple[tuple[str, _Encoder, _Decoder, Any], ...]] = {}


def _codec_for(tp: Any) -> tuple[_Encoder, _Decoder]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        enc, dec = _codec_for(inner)
        return (lambda v: None if v is None else enc(v)), (lambda v: None if v is None else dec(v))
    if origin is tuple:
        enc, dec = _codec_for(typing.get_args(tp)[0])
        return (lambda v: [enc(x) for x in v]), (lambda v: tuple(dec(x) for x in v))
    if origin in (Mapping, dict):
        return (lambda v: dict(v)), (lambda v: {str(k): str(x) for k, x in v.items()})
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        cls: type[Any] = tp
        return to_dict, (lambda v: from_dict(cls, v))
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        enum_cls: type[StrEnum] = tp
        return (lambda v: v.value), (lambda v: enum_cls(v))
    if tp is float:
        return (lambda v: v), (lambda v: float(v))
    if tp is int:
        return (lambda v: v), (lambda v: int(v))
    if tp in (str, bool):
        return (lambda v: v), (lambda v: v)
    raise TypeError(f"no JSON codec for {tp!r}")


def _plan(cls: type) -> tuple[tuple[str, _Encoder, _Decoder, Any], ...]:
    plan = _plans.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            enc, dec = _codec_for(hints[f.name])
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            rows.append((f.name, enc, dec, default))
        plan = _plans[cls] = tuple(rows)
    return plan


def to_dict(obj: Any) -> dict[str, Any]:
    """The record as its proto message's JSON mapping, fields at their default omitted."""
    out: dict[str, Any] = {}
    for name, enc, _dec, default in _plan(type(obj)):
        value = getattr(obj, name)
        if default is not dataclasses.MISSING and value == default:
            continue
        out[name] = enc(value)
    return out


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build a record from JSON; a missing field takes its default, an unknown one is an error."""
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    kwargs: dict[str, Any] = {}
    plan = _plan(cls)
    known = {row[0] for row in plan}
    unknown = set(data) - known
    if unknown:
        named = quote(", ".join(sorted(map(str, unknown))))
        raise InvalidInput(f"{cls.__name__}: unknown field(s) {named}")
    for name, _enc, dec, default in plan:
        if name in data:
            try:
                kwargs[name] = dec(data[name])
            except (ValueError, TypeError, AttributeError) as e:
                raise InvalidInput(f"{cls.__name__}.{name}: {clip(str(e))}") from None
        elif default is dataclasses.MISSING:
            raise InvalidInput(f"{cls.__name__}: field {name!r} is required")
    return cls(**kwargs)


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
"""One encoder for every record (`json.dumps` with options builds a new one per call)."""


def dumps(obj: Any) -> bytes:
    """The bytes stored in etcd: compact JSON, keys sorted so equal records are equal bytes."""
    return _ENCODER.encode(to_dict(obj)).encode()


def loads(cls: type[T], raw: bytes | str) -> T:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidInput(f"{cls.__name__}: not JSON: {clip(str(e))}") from None
    return from_dict(cls, data)


def dumps_assignment(a: Assignment, vm_json: bytes) -> bytes:
    """`dumps(a)` built around `vm_json` (= `dumps(a.vm)`), which the planner has already
    encoded for the spec it writes in the same transaction. Same bytes, half the work."""
    host = json.dumps(a.host)
    return b'{"epoch":%d,"host":%s,"vm":%s}' % (a.epoch, host.encode(), vm_json)


def loads_assignment(raw: bytes, vm: VM | None = None, vm_json: bytes = b"") -> Assignment:
    """`loads(Assignment, raw)`, reusing `vm` when `raw` carries exactly `vm_json`
    (its spec, seen in the same watch batch): only the epoch and host are decoded."""
    tail = b',"vm":' + vm_json + b"}"
    if vm is not None and vm_json and raw.endswith(tail):
        try:
            head = json.loads(raw[: len(raw) - len(tail)] + b"}")
        except ValueError:
            head = None
        if (
            isinstance(head, dict)
            and head.keys() == {"epoch", "host"}
            and isinstance(head["host"], str)
            and type(head["epoch"]) is int
        ):
            return Assignment(vm=vm, host=head["host"], epoch=head["epoch"])
    return loads(Assignment, raw)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """An idempotency record: a retried create with the same id returns the same result."""

    request_id: str
    kind: str
    targets: tuple[str, ...] = ()
    fingerprint: str = ""
    created_at: float = 0.0
