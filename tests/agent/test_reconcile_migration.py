"""Table tests of the agent's planning while a live migration is recorded: the target keeps
the incoming guest, the source never re-creates a migrated one, the new assignment adopts."""

from __future__ import annotations

import dataclasses

import pytest
from hvplace.agent.reconcile import ActionKind, Observed, plan
from hvplace.proto.records import VM, Assignment, DomainState, Image, Migration

KERNEL = Image(kernel="/k", initrd="/i", cmdline="console=ttyS0")
VM_A = VM(scope="s", name="a", uid="u-a", image=KERNEL)
R, P = DomainState.RUNNING, DomainState.PAUSED


def assigned(host: str, epoch: int, adopt: int = 0) -> dict[str, Assignment]:
    return {"s/a": Assignment(vm=VM_A, host=host, epoch=epoch, adopt_epoch=adopt)}


def seen(state: DomainState, epoch: int, uid: str = "u-a") -> dict[str, Observed]:
    return {"s/a": Observed("s", "a", "d-a", uid=uid, epoch=epoch, state=state)}


MOVE = Migration(scope="s", name="a", uid="u-a", source="src", target="dst", epoch=3)
COLD = dataclasses.replace(MOVE, restart=True)

CASES = [
    # (id, host, desired, actual, migrations, expected [(kind, key)])
    ("target keeps the incoming guest", "dst", {}, seen(P, 3), {"s/a": MOVE}, []),
    ("target keeps it once it runs", "dst", {}, seen(R, 3), {"s/a": MOVE}, []),
    (
        "target destroys it once the record is gone",
        "dst",
        {},
        seen(R, 3),
        {},
        [(ActionKind.DESTROY, "s/a"), (ActionKind.UNDEFINE, "s/a")],
    ),
    (
        "target destroys a guest of another epoch",
        "dst",
        {},
        seen(R, 2),
        {"s/a": MOVE},
        [(ActionKind.DESTROY, "s/a"), (ActionKind.UNDEFINE, "s/a")],
    ),
    (
        "target destroys a guest of another VM (uid)",
        "dst",
        {},
        seen(R, 3, uid="u-old"),
        {"s/a": MOVE},
        [(ActionKind.DESTROY, "s/a"), (ActionKind.UNDEFINE, "s/a")],
    ),
    ("source runs on while migrating", "src", assigned("src", 3), seen(R, 3), {"s/a": MOVE}, []),
    ("source never re-creates a migrated guest", "src", assigned("src", 3), {}, {"s/a": MOVE}, []),
    (
        "source re-creates once the record is gone (aborted)",
        "src",
        assigned("src", 3),
        {},
        {},
        [(ActionKind.DEFINE, "s/a"), (ActionKind.START, "s/a")],
    ),
    (
        "the new assignment adopts the migrated guest",
        "dst",
        assigned("dst", 4, adopt=3),
        seen(R, 3),
        {},
        [(ActionKind.RETAG, "s/a")],
    ),
    ("adopted and re-tagged: nothing more", "dst", assigned("dst", 4, adopt=3), seen(R, 4), {}, []),
    (
        "adopt_epoch never adopts another epoch",
        "dst",
        assigned("dst", 4, adopt=3),
        seen(R, 2),
        {},
        [
            (ActionKind.DESTROY, "s/a"),
            (ActionKind.UNDEFINE, "s/a"),
            (ActionKind.DEFINE, "s/a"),
            (ActionKind.START, "s/a"),
        ],
    ),
    (
        "cold move: the source destroys (its assignment is gone)",
        "src",
        {},
        seen(R, 3),
        {"s/a": COLD},
        [(ActionKind.DESTROY, "s/a"), (ActionKind.UNDEFINE, "s/a")],
    ),
]


@pytest.mark.parametrize(
    ("host", "desired", "actual", "migrations", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_plan_during_a_migration(
    host: str,
    desired: dict[str, Assignment],
    actual: dict[str, Observed],
    migrations: dict[str, Migration],
    expected: list[tuple[ActionKind, str]],
) -> None:
    got = plan(host, desired, actual, migrations=migrations)
    assert [(a.kind, a.key) for a in got.actions] == expected


def test_a_fenced_target_destroys_the_incoming_guest() -> None:
    got = plan("dst", {}, seen(P, 3), fenced=True, migrations={"s/a": MOVE})
    assert [(a.kind, a.key) for a in got.actions] == [(ActionKind.DESTROY, "s/a")]
