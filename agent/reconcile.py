"""The agent's planning, pure: (desired assignments, observed domains) -> ordered actions.

Level-triggered: the same inputs always give the same plan, and applying it then planning
again from what libvirt reports gives an empty plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import Assignment, DomainState, Migration, Power
from hvplace.proto.validation import validate_vm


class ActionKind(StrEnum):
    RETAG = "retag"
    DESTROY = "destroy"
    UNDEFINE = "undefine"
    STOP = "stop"
    DEFINE = "define"
    START = "start"


# Removal first, so a re-created domain (stale epoch) never meets its old self, and
# capacity is freed before anything new starts.
_ORDER = {
    ActionKind.RETAG: 0,
    ActionKind.DESTROY: 0,
    ActionKind.UNDEFINE: 1,
    ActionKind.STOP: 2,
    ActionKind.DEFINE: 3,
    ActionKind.START: 4,
}

ACTIVE = frozenset({DomainState.RUNNING, DomainState.PAUSED})
STARTABLE = frozenset({DomainState.DEFINED, DomainState.STOPPED, DomainState.CRASHED})


@dataclass(frozen=True, slots=True)
class Observed:
    """A managed libvirt domain: its hvplace tag and its state."""

    scope: str
    name: str
    domain: str
    uid: str = ""
    epoch: int = 0
    state: DomainState = DomainState.DEFINED

    @property
    def key(self) -> str:
        return f"{self.scope}/{self.name}"


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    key: str
    domain: str = ""
    assignment: Assignment | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...] = ()
    # Assignments refused before anything reached libvirt: key -> message.
    rejected: Mapping[str, str] = field(default_factory=dict)


def check_assignment(key: str, assignment: Assignment, host: str) -> None:
    """Raise InvalidInput when an assignment must not become a domain on this host."""
    vm = validate_vm(assignment.vm)
    if assignment.host != host:
        raise InvalidInput(f"assignment {key} names host {assignment.host!r}, not {host!r}")
    if vm.key != key:
        raise InvalidInput(f"assignment at {key} carries VM {vm.key}")
    if assignment.epoch < 1:
        raise InvalidInput(f"assignment {key} has epoch {assignment.epoch}; it must be >= 1")
    if not vm.image.kernel and not vm.image.disk:
        raise InvalidInput(f"VM {key} has no image: give a kernel or a base disk")
    if vm.image.initrd and not vm.image.kernel:
        raise InvalidInput(f"VM {key} has an initrd but no kernel")


def plan(
    host: str,
    desired: Mapping[str, Assignment],
    actual: Mapping[str, Observed],
    *,
    may_start: bool = True,
    fenced: bool = False,
    keep: frozenset[str] = frozenset(),
    migrations: Mapping[str, Migration] | None = None,
) -> Plan:
    """What to do so that libvirt matches the assignments.

    `may_start` is False until the agent holds a lease and has read its assignments;
    `fenced` means the lease was lost: every active managed domain is destroyed and
    nothing is started (SPEC §4). `keep`: keys whose assignment exists but could not be
    read (a malformed record); their domains are left as they are.

    `migrations`: live migrations from or to this host. The target keeps the incoming
    domain (the record's uid and epoch) though nothing is assigned here yet; the source
    never re-creates a VM whose domain is gone while its migration is recorded (libvirt
    moved it: re-creating it would run it twice). An assignment with `adopt_epoch` takes
    over the migrated-in domain of that epoch by re-tagging it.
    """
    moving = migrations or {}
    actions: list[Action] = []
    rejected: dict[str, str] = {}
    valid: dict[str, Assignment] = {}
    for key, wanted in desired.items():
        try:
            check_assignment(key, wanted, host)
        except InvalidInput as e:
            rejected[key] = e.message
        else:
            valid[key] = wanted
    starting = may_start and not fenced

    for key, obs in actual.items():
        a = valid.get(key)
        if fenced:
            if obs.state in ACTIVE:
                actions.append(Action(ActionKind.DESTROY, key, obs.domain, a, "fenced"))
            continue
        m = moving.get(key)
        incoming = m is not None and m.target == host and (obs.uid, obs.epoch) == (m.uid, m.epoch)
        if a is None:
            if incoming:
                continue  # a live migration's incoming guest: the coordinator settles it
            if key in rejected or key in keep:
                # Its assignment exists but is malformed: keep hands off a domain that
                # may be healthy; the error is reported on its status.
                continue
            why = "no assignment to this host"
        elif a.adopt_epoch and obs.epoch == a.adopt_epoch and obs.uid == a.vm.uid:
            actions.append(Action(ActionKind.RETAG, key, obs.domain, a, "live-migrated here"))
            continue
        elif obs.epoch != a.epoch or obs.uid != a.vm.uid:
            why = f"stale: domain epoch {obs.epoch} uid {obs.uid!r}, assigned epoch {a.epoch} uid {a.vm.uid!r}"
        else:
            if a.vm.power is Power.RUNNING and obs.state in STARTABLE and starting:
                actions.append(Action(ActionKind.START, key, obs.domain, a, "desired running"))
            elif a.vm.power is Power.STOPPED and obs.state in ACTIVE:
                actions.append(Action(ActionKind.STOP, key, obs.domain, a, "desired stopped"))
            continue
        if obs.state in ACTIVE:
            actions.append(Action(ActionKind.DESTROY, key, obs.domain, None, why))
        actions.append(Action(ActionKind.UNDEFINE, key, obs.domain, None, why))
        if a is not None and not fenced:
            actions.append(Action(ActionKind.DEFINE, key, "", a, "re-create at current epoch"))
            if a.vm.power is Power.RUNNING and starting:
                actions.append(Action(ActionKind.START, key, "", a, "desired running"))

    if not fenced:
        for key, new in valid.items():
            if key in actual:
                continue
            m = moving.get(key)
            if m is not None and m.source == host and (m.uid, m.epoch) == (new.vm.uid, new.epoch):
                continue  # migrated away (or going): the coordinator moves the assignment
            actions.append(Action(ActionKind.DEFINE, key, "", new, "assigned to this host"))
            if new.vm.power is Power.RUNNING and starting:
                actions.append(Action(ActionKind.START, key, "", new, "desired running"))

    actions.sort(key=lambda x: (_ORDER[x.kind], x.key))
    return Plan(tuple(actions), rejected)
