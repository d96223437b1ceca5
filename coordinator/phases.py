"""A VM's phase as users read it, derived each time from the records (pure): the
coordinator's VMStatus, the current assignment and its host agent's domain report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hvplace.proto.records import (
    VM,
    Assignment,
    DomainState,
    DomainStatus,
    HostInfo,
    Phase,
    Power,
    StartFailure,
    VMStatus,
)

_RUNNING = frozenset({DomainState.RUNNING, DomainState.PAUSED})
_OFF = frozenset({DomainState.DEFINED, DomainState.STOPPED})


@dataclass(frozen=True, slots=True)
class Derived:
    phase: Phase
    reason: str = ""


def reports_current(domain: DomainStatus | None, a: Assignment | None) -> bool:
    """Whether the domain report is about this very assignment (host, epoch, uid): a
    report from an old host or epoch says nothing about where the VM is now."""
    return (
        domain is not None
        and a is not None
        and domain.host == a.host
        and domain.epoch == a.epoch
        and (not domain.uid or domain.uid == a.vm.uid)
    )


def failures_text(failures: tuple[StartFailure, ...], limit: int = 200) -> str:
    """`h1: <libvirt's message>; h2: ...`, each message cut to `limit` characters."""
    parts = []
    for f in failures:
        reason = f.reason if len(f.reason) <= limit else f.reason[: limit - 3] + "..."
        parts.append(f"{f.host}: {reason}")
    return "; ".join(parts)


def derive(
    vm: VM,
    status: VMStatus | None,
    assignment: Assignment | None,
    domain: DomainStatus | None,
    host: HostInfo | None = None,
) -> Derived:
    """pending / failed as the coordinator recorded them; for an assigned VM, what its
    host's agent reports at the current epoch: running, stopped, failed (with libvirt's
    message) or, until it reports, scheduled. A degraded host is named in the reason."""
    if status is None:
        return Derived(Phase.PENDING, "")
    if status.phase in (Phase.FAILED, Phase.PENDING) or assignment is None:
        return Derived(status.phase, status.reason)
    derived = _assigned(vm, status, assignment, domain)
    if host is not None and host.hypervisor_error:
        note = f"host {assignment.host} degraded: {host.hypervisor_error}"
        reason = f"{derived.reason}; {note}" if derived.reason else note
        derived = Derived(derived.phase, reason)
    return derived


def _assigned(vm: VM, status: VMStatus, a: Assignment, domain: DomainStatus | None) -> Derived:
    retry = ""
    if status.start_failures:
        retry = f"failed to start on {failures_text(status.start_failures)}"
    if not reports_current(domain, a):
        return Derived(Phase.SCHEDULED, retry or status.reason)
    assert domain is not None
    state = domain.state
    if state is DomainState.FAILED:
        return Derived(Phase.FAILED, f"on {a.host}: {domain.last_error or 'failed'}")
    if state in _RUNNING:
        return Derived(Phase.RUNNING, "")
    if state in _OFF and vm.power is Power.STOPPED:
        return Derived(Phase.STOPPED, "")
    if state is DomainState.CRASHED:
        return Derived(Phase.SCHEDULED, f"crashed on {a.host}; its agent restarts it")
    if state is DomainState.FENCED:
        return Derived(Phase.SCHEDULED, f"host {a.host} fenced itself; waiting for its lease")
    return Derived(Phase.SCHEDULED, retry or "starting")


def derive_all(
    vms: Mapping[str, VM],
    statuses: Mapping[str, VMStatus],
    assignments: Mapping[str, Assignment],
    domains: Mapping[str, DomainStatus],
    hosts: Mapping[str, HostInfo],
) -> dict[str, Derived]:
    out: dict[str, Derived] = {}
    for key, vm in vms.items():
        a = assignments.get(key)
        out[key] = derive(
            vm, statuses.get(key), a, domains.get(key), hosts.get(a.host) if a else None
        )
    return out
