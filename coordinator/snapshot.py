"""A pure view of the cluster at one etcd revision: what the placement engine reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hvplace.proto.models import (
    VM,
    Assignment,
    Host,
    HostInfo,
    HostState,
    HostStatus,
    Rule,
    ScopePolicy,
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything placement needs, keyed as in etcd.

    `placements` maps a VM key (scope/name) to the host it is assigned to now;
    `reservations` maps a VM key to a second host on which it holds capacity and
    counts for every rule while a migration or evacuation is in flight (SPEC §5.4).
    `degraded` maps a VM key to the rules it knowingly breaks (on_failure=degrade).
    """

    revision: int = 0
    hosts: Mapping[str, Host] = field(default_factory=dict)
    vms: Mapping[str, VM] = field(default_factory=dict)
    placements: Mapping[str, str] = field(default_factory=dict)
    rules: Mapping[str, Rule] = field(default_factory=dict)
    policies: Mapping[str, ScopePolicy] = field(default_factory=dict)
    reservations: Mapping[str, str] = field(default_factory=dict)
    degraded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_records(
        cls,
        revision: int,
        infos: Iterable[HostInfo],
        statuses: Mapping[str, HostStatus],
        vms: Iterable[VM] | Mapping[str, VM],
        assignments: Iterable[Assignment],
        rules: Iterable[Rule],
        policies: Iterable[ScopePolicy],
        alive: Iterable[str] | None = None,
        placements: Mapping[str, str] | None = None,
        reservations: Mapping[str, str] | None = None,
    ) -> Snapshot:
        """Build from the records as read from etcd.

        `alive`, when given, names the hosts whose registration (lease) exists now; a
        registered host missing from it is treated as lost even before the coordinator
        has written its `lost` status. `vms` keyed by VM key and `placements` (VM key ->
        host, instead of `assignments`) are copied as they are: a cache that keeps them
        so spares a pass over every VM per revision.
        """
        alive_set = None if alive is None else set(alive)
        hosts: dict[str, Host] = {}
        for info in infos:
            host = Host.from_records(info, statuses.get(info.name))
            if alive_set is not None and info.name not in alive_set:
                host = Host(
                    name=host.name,
                    labels=host.labels,
                    capacity=host.capacity,
                    ratios=host.ratios,
                    reserved_memory_mib=host.reserved_memory_mib,
                    state=HostState.LOST,
                )
            hosts[info.name] = host
        return cls(
            revision=revision,
            hosts=hosts,
            vms=dict(vms) if isinstance(vms, Mapping) else {vm.key: vm for vm in vms},
            placements=(
                dict(placements)
                if placements is not None
                else {a.vm.key: a.host for a in assignments}
            ),
            rules={r.key: r for r in rules},
            policies={p.scope: p for p in policies},
            reservations=dict(reservations or {}),
        )
