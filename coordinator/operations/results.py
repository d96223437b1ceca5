"""What the API calls answer, one dataclass per reply message, shaped field for field like
it (convert.to_proto translates them); grouped by noun."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hvplace.coordinator.admission import AdmissionReport
from hvplace.proto.records import (
    VM,
    ClusterConfig,
    DomainStatus,
    HostInfo,
    HostStatus,
    Resources,
    Rule,
    VMStatus,
)

# --------------------------------------------------------------------------- VMs


@dataclass(frozen=True, slots=True)
class VMView:
    spec: VM
    status: VMStatus | None = None
    domain: DomainStatus | None = None


@dataclass(frozen=True, slots=True)
class CreateVMsResult:
    # No defaults: a field equal to its default is left out of the JSON, and proto3's
    # default for `ok` is false.
    vms: tuple[VMView, ...]
    admission: AdmissionReport


# --------------------------------------------------------------------------- rules


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
class RuleResult:
    rule: RuleView
    admission: AdmissionReport


# --------------------------------------------------------------------------- hosts


@dataclass(frozen=True, slots=True)
class HostView:
    info: HostInfo
    status: HostStatus | None = None
    alive: bool = False
    allocatable: Resources = field(default_factory=Resources)
    used: Resources = field(default_factory=Resources)
    vms: tuple[str, ...] = ()


# --------------------------------------------------------------------------- cluster


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
