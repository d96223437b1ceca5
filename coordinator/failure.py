"""Host failure, pure: when an unregistered host counts as lost (derived from the records,
level-triggered), and lost hosts → their VMs re-placed by HA priority with every rule."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from hvplace.coordinator.placement import Plan
from hvplace.coordinator.placement.engine import build_index, replace_vms
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.models import HostState, HostStatus


def lost_at(
    unregistered: Iterable[str],
    statuses: Mapping[str, HostStatus],
    seen_gone: Mapping[str, float],
    *,
    office_since: float,
    lease_ttl_s: float,
) -> dict[str, float]:
    """When each unregistered host not yet marked lost is to be declared lost.

    A host whose registration this process saw deleted is lost from that moment: the
    key rides the agent's lease, so the lease had expired (and the agent fenced). Of a
    host found absent without a delete (this leader started after it vanished, or
    relisted) nothing says when it went, so it is lost one lease TTL after this leader
    took office: by then any lease that registration could still ride has expired.
    The answer depends only on records and this term's start, never on a missed event.
    """
    due: dict[str, float] = {}
    for name in unregistered:
        status = statuses.get(name)
        if status is not None and status.state is HostState.LOST:
            continue
        due[name] = seen_gone.get(name, office_since + lease_ttl_s)
    return due


def replace_lost(snapshot: Snapshot, lost_hosts: Collection[str]) -> Plan:
    """A plan for the VMs assigned to `lost_hosts`; those hosts take nothing and what
    ran there no longer counts. `off` VMs stay pending; a VM that would break an
    on_failure=degrade rule is placed anyway and listed in `degraded`."""
    lost = set(lost_hosts)
    moving = [
        snapshot.vms[key]
        for key, host in sorted(snapshot.placements.items())
        # A VM live-migrating off a lost host is settled by its migration (completed
        # where it runs now, or aborted and then re-placed here): coordinator/migration.py.
        if host in lost and key in snapshot.vms and key not in snapshot.reservations
    ]
    index = build_index(snapshot, moving, lost_hosts=lost)
    return replace_vms(index, snapshot.revision, moving, degrade=True)
