"""Table tests of the agent's pure planning: (desired, observed) -> actions."""

from __future__ import annotations

import pytest
from hvplace.agent.reconcile import ActionKind, Observed, plan
from hvplace.proto.records import VM, Assignment, DomainState, Image, Power, Resources

HOST = "h1"
KERNEL = Image(kernel="/k", initrd="/i", cmdline="console=ttyS0")


def assign(name: str, epoch: int = 1, power: Power = Power.RUNNING, **vm: object) -> Assignment:
    fields: dict[str, object] = {"image": KERNEL, "uid": f"u-{name}", "power": power, **vm}
    return Assignment(vm=VM(scope="s", name=name, **fields), host=HOST, epoch=epoch)  # type: ignore[arg-type]


def seen(name: str, state: DomainState, epoch: int = 1, uid: str | None = None) -> Observed:
    return Observed(
        scope="s",
        name=name,
        domain=f"d-{name}",
        uid=f"u-{name}" if uid is None else uid,
        epoch=epoch,
        state=state,
    )


R, S, C, P, D = (
    DomainState.RUNNING,
    DomainState.STOPPED,
    DomainState.CRASHED,
    DomainState.PAUSED,
    DomainState.DEFINED,
)
DEF, START, STOP, DESTROY, UNDEF = (
    ActionKind.DEFINE,
    ActionKind.START,
    ActionKind.STOP,
    ActionKind.DESTROY,
    ActionKind.UNDEFINE,
)

CASES = [
    # (id, desired, actual, flags, expected [(kind, key)])
    ("new VM is defined and started", [assign("a")], [], {}, [(DEF, "a"), (START, "a")]),
    ("new stopped VM is only defined", [assign("a", power=Power.STOPPED)], [], {}, [(DEF, "a")]),
    ("running and current: nothing", [assign("a")], [seen("a", R)], {}, []),
    ("crashed is restarted", [assign("a")], [seen("a", C)], {}, [(START, "a")]),
    ("shut off is started", [assign("a")], [seen("a", S)], {}, [(START, "a")]),
    ("paused is left paused", [assign("a")], [seen("a", P)], {}, []),
    (
        "desired stopped: stop",
        [assign("a", power=Power.STOPPED)],
        [seen("a", R)],
        {},
        [(STOP, "a")],
    ),
    (
        "unassigned running: destroy, undefine",
        [],
        [seen("a", R)],
        {},
        [(DESTROY, "a"), (UNDEF, "a")],
    ),
    ("unassigned off: undefine", [], [seen("a", S)], {}, [(UNDEF, "a")]),
    (
        "stale epoch: re-created",
        [assign("a", epoch=3)],
        [seen("a", R, epoch=2)],
        {},
        [(DESTROY, "a"), (UNDEF, "a"), (DEF, "a"), (START, "a")],
    ),
    (
        "other uid (VM re-created with the same name): re-created",
        [assign("a")],
        [seen("a", S, uid="old")],
        {},
        [(UNDEF, "a"), (DEF, "a"), (START, "a")],
    ),
    ("before the lease: define, no start", [assign("a")], [], {"may_start": False}, [(DEF, "a")]),
    ("before the lease: adopt running", [assign("a")], [seen("a", R)], {"may_start": False}, []),
    (
        "fenced: destroy active, start nothing",
        [assign("a"), assign("b")],
        [seen("a", R), seen("b", S), seen("c", P)],
        {"fenced": True},
        [(DESTROY, "a"), (DESTROY, "c")],
    ),
    (
        "removals come before creations",
        [assign("b")],
        [seen("a", R)],
        {},
        [(DESTROY, "a"), (UNDEF, "a"), (DEF, "b"), (START, "b")],
    ),
    (
        "unreadable assignment keeps its domain",
        [],
        [seen("a", R)],
        {"keep": frozenset({"s/a"})},
        [],
    ),
]


@pytest.mark.parametrize(
    ("desired", "actual", "flags", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan(
    desired: list[Assignment],
    actual: list[Observed],
    flags: dict[str, object],
    expected: list[tuple[ActionKind, str]],
) -> None:
    p = plan(HOST, {a.vm.key: a for a in desired}, {o.key: o for o in actual}, **flags)  # type: ignore[arg-type]
    assert [(a.kind, a.key.split("/")[1]) for a in p.actions] == expected
    assert not p.rejected


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        (assign("a", resources=Resources(vcpus=1, memory_mib=0)), "memory_mib is 0"),
        (assign("a", image=Image()), "has no image"),
        (assign("a", image=Image(kernel="relative/k")), "must be absolute"),
        (assign("a", epoch=0), "epoch 0"),
        (
            Assignment(vm=VM(scope="s", name="a", image=KERNEL), host="h2", epoch=1),
            "names host 'h2'",
        ),
    ],
)
def test_bad_spec_is_rejected_and_nothing_defined(assignment: Assignment, message: str) -> None:
    p = plan(HOST, {"s/a": assignment}, {})
    assert p.actions == ()
    assert message in p.rejected["s/a"]


def test_rejected_assignment_leaves_its_running_domain_alone() -> None:
    bad = assign("a", resources=Resources(vcpus=0, memory_mib=64))
    p = plan(HOST, {"s/a": bad}, {"s/a": seen("a", R)})
    assert p.actions == () and "vcpus" in p.rejected["s/a"]


def test_plan_is_idempotent_once_applied() -> None:
    desired = {a.vm.key: a for a in (assign("a"), assign("b", power=Power.STOPPED))}
    after = {
        "s/a": seen("a", R),
        "s/b": seen("b", D),
    }
    assert plan(HOST, desired, after).actions == ()
