"""The host API calls: list and read hosts with their derived state and usage, and the
operator's cordon, uncordon and drain."""

from __future__ import annotations

import time

from hvplace.coordinator.operations.backend import ClusterView
from hvplace.coordinator.operations.noun import Noun
from hvplace.coordinator.operations.results import HostView
from hvplace.coordinator.store import Txn
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import Conflict, NotFound
from hvplace.proto.names import check_name
from hvplace.proto.records import Host, HostInfo, HostState, HostStatus, Resources, host_state


def host_view(view: ClusterView, name: str) -> HostView:
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


def find(view: ClusterView, name: str) -> None:
    check_name(name, "host name")
    known = name in view.hosts or name in view.host_status or name in view.snapshot.hosts
    if not known:
        raise NotFound(f"host {name} is not registered")


class Hosts(Noun):
    async def list(self) -> list[HostView]:
        view = self.backend.view()
        names = sorted(set(view.hosts) | set(view.host_status) | set(view.snapshot.hosts))
        return [host_view(view, n) for n in names]

    async def get(self, name: str) -> HostView:
        view = self.backend.view()
        find(view, name)
        return host_view(view, name)

    async def _set_state(self, name: str, state: HostState, reason: str) -> HostView:
        check_name(name, "host name")
        self.require_leader()
        key = keyspace.host_status(name)

        async def change(txn: Txn) -> None:
            find(await self.backend.fresh_view(), name)
            raw = await txn.get(key)
            current = codec.loads(HostStatus, raw) if raw is not None else None
            if current is not None and current.state is HostState.LOST:
                raise Conflict(f"host {name} is lost; it takes a new state when its agent returns")
            if current is not None and current.state is state:
                return  # already so: nothing to write
            status = HostStatus(
                name=name,
                state=state,
                reason=reason,
                since=time.time(),
                labels=current.labels if current is not None else {},
            )
            txn.put(key, codec.dumps(status))

        await self.backend.update(change, subject=f"host {name} status")
        return host_view(self.backend.view(), name)

    async def cordon(self, name: str) -> HostView:
        return await self._set_state(name, HostState.CORDONED, "cordoned by an operator")

    async def uncordon(self, name: str) -> HostView:
        return await self._set_state(name, HostState.READY, "uncordoned by an operator")

    async def drain(self, name: str) -> HostView:
        return await self._set_state(
            name,
            HostState.DRAINING,
            "draining: takes no new VMs; `hvplace host drain` (MaintenanceService.Drain)"
            " moves its VMs away",
        )
