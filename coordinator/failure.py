"""Lost hosts → their VMs re-placed by HA priority with every required rule (pure)."""

from __future__ import annotations

from collections.abc import Collection

from hvplace.coordinator.placement import Plan
from hvplace.coordinator.placement.engine import build_index, replace_vms
from hvplace.coordinator.snapshot import Snapshot


def replace_lost(snapshot: Snapshot, lost_hosts: Collection[str]) -> Plan:
    """A plan for the VMs assigned to `lost_hosts`; those hosts take nothing and what
    ran there no longer counts. `off` VMs stay pending; a VM that would break an
    on_failure=degrade rule is placed anyway and listed in `degraded`."""
    lost = set(lost_hosts)
    moving = [
        snapshot.vms[key]
        for key, host in sorted(snapshot.placements.items())
        if host in lost and key in snapshot.vms
    ]
    index = build_index(snapshot, moving, lost_hosts=lost)
    return replace_vms(index, snapshot.revision, moving, degrade=True)
