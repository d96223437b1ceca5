"""The rebalancer's API side (SPEC §5.7): preview and apply the planner's moves
(coordinator/placement/rebalance.py) through one `Mover`, and make a changed rule, scope
policy or host label hold by moving VMs first. The leader's own loop is autorebalance.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hvplace.coordinator.placement import rule_compliance
from hvplace.coordinator.placement.rebalance import Move, RebalancePlan, plan_rebalance
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto.errors import Conflict, HvplaceError, InvalidInput, Unavailable
from hvplace.proto.records import VMStatus

log = logging.getLogger(__name__)

MAX_APPLY = 1_000
"""Moves one `rebalance --apply` may carry out."""


class Mover(Protocol):
    """Carries out one move of the rebalancer; raises an HvplaceError when it cannot
    (the VM then stays where it was). `moves.ColdMover` re-assigns the VM cold; live
    migration plugs in here."""

    async def move(self, vm: str, target: str) -> None:
        """Move VM `vm` (`scope/name`) to host `target`."""
        ...


@dataclass(frozen=True, slots=True)
class MoveView:
    vm: str
    source: str
    target: str
    why: str = ""
    done: bool = False
    error: str = ""


@dataclass(frozen=True, slots=True)
class RebalanceView:
    moves: tuple[MoveView, ...] = ()
    repair_moves: int = 0
    minimal: bool = False
    broken: tuple[str, ...] = ()
    unrepaired: Mapping[str, str] = field(default_factory=dict)
    improved: tuple[str, ...] = ()
    truncated: int = 0
    applied: bool = False


def _view(plan: RebalancePlan, moves: Sequence[MoveView] | None = None) -> RebalanceView:
    return RebalanceView(
        moves=tuple(
            moves
            if moves is not None
            else (MoveView(m.vm, m.source, m.target, m.why) for m in plan.moves)
        ),
        repair_moves=plan.repair_moves,
        minimal=plan.minimal,
        broken=plan.broken,
        unrepaired=plan.unrepaired,
        improved=plan.improved,
        truncated=plan.truncated,
        applied=moves is not None,
    )


_RUNNING: set[asyncio.Task[list[MoveView]]] = set()
"""Moves carried on after their caller went away (kept referenced until done)."""


async def carry_out(mover: Mover, moves: Sequence[Move], *, detach: bool = True) -> list[MoveView]:
    """Each move in order; one that fails is reported and the others go on. With
    `detach`, a caller that goes away (an API call past its deadline) does not cut a
    move in half: the moves finish in the background. The leader's own loop does not
    detach: its moves stop with its leadership (each step is fenced)."""
    if not detach:
        return await _carry_out(mover, moves)
    task = asyncio.ensure_future(_carry_out(mover, moves))
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return await asyncio.shield(task)


async def _carry_out(mover: Mover, moves: Sequence[Move]) -> list[MoveView]:
    done: list[MoveView] = []
    for m in moves:
        try:
            await mover.move(m.vm, m.target)
        except HvplaceError as e:
            log.warning("move of %s to %s failed: %s", m.vm, m.target, e.message)
            done.append(MoveView(m.vm, m.source, m.target, m.why, error=e.message))
        else:
            done.append(MoveView(m.vm, m.source, m.target, m.why, done=True))
    return done


class Rebalancing:
    """API side: `preview`, `apply`, and `make_hold` for rule, policy and label changes."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        fresh: Callable[[], object],
        mover: Mover | None,
        require_leader: Callable[[], None] = lambda: None,
    ) -> None:
        self._snapshot = snapshot
        self._fresh = fresh
        self.mover = mover
        self._require_leader = require_leader

    async def _fresh_snapshot(self) -> Snapshot:
        waited = self._fresh()
        if asyncio.iscoroutine(waited):
            await waited
        return self._snapshot()

    @staticmethod
    def _budget(max_moves: int) -> int:
        if max_moves < 0 or max_moves > MAX_APPLY:
            raise InvalidInput(f"max_moves {max_moves} must be 0 (no cap) to {MAX_APPLY}")
        return max_moves

    async def preview(self, max_moves: int) -> RebalanceView:
        budget = self._budget(max_moves)
        return _view(plan_rebalance(await self._fresh_snapshot(), budget))

    async def apply(self, max_moves: int) -> RebalanceView:
        budget = self._budget(max_moves) or MAX_APPLY
        self._require_leader()
        if self.mover is None:
            raise Unavailable("this coordinator has no mover; ask the leader")
        plan = plan_rebalance(await self._fresh_snapshot(), budget)
        return _view(plan, await carry_out(self.mover, plan.moves))

    async def make_hold(self, changed: Snapshot, what: str, keys: frozenset[str]) -> int:
        """Move VMs so that every required group holds in `changed` (the snapshot with
        the new rule, policy or labels) among `keys`, the groups the change breaks; the
        others may not get worse. The moves are planned under the change, and each
        is checked by the engine against the rules in force when it runs. Conflict
        (nothing more moved) when the change cannot be made to hold; returns the moves."""
        if not keys:
            return 0
        plan = plan_rebalance(changed, improve=False, only=keys)
        stuck = plan.unrepaired
        if stuck:
            detail = "; ".join(f"`{k}`: {v}" for k, v in sorted(stuck.items())[:5])
            raise Conflict(f"{what} cannot be made to hold by moving VMs: {detail}")
        if not plan.moves:
            return 0
        if self.mover is None:
            raise Unavailable("this coordinator has no mover; ask the leader")
        done = await carry_out(self.mover, plan.moves)
        failed = [m for m in done if not m.done]
        if failed:
            detail = "; ".join(f"{m.vm} to {m.target}: {m.error}" for m in failed[:5])
            raise Conflict(
                f"{what}: {len(done) - len(failed)} of {len(done)} moves done, then: {detail};"
                " nothing else was changed"
            )
        return len(done)


def with_degraded(snapshot: Snapshot, statuses: Mapping[str, VMStatus]) -> Snapshot:
    """The snapshot with the rules each VM knowingly breaks (its status' `degraded`), so
    the planner moves those VMs first."""
    degraded = {k: s.degraded for k, s in statuses.items() if s.degraded}
    if not degraded:
        return snapshot
    return dataclasses.replace(snapshot, degraded={**snapshot.degraded, **degraded})


def breaking(what: str, broken: Iterable[str], advice: str, where: str = "") -> Conflict:
    """The refusal of a change (labels) that would break required rules, naming them."""
    rules = ", ".join(f"`{k}`" for k in sorted(broken))
    return Conflict(f"{what} would break {rules}{where}; {advice}")


def newly_broken(before: Snapshot, after: Snapshot) -> frozenset[str]:
    """Required rules and policy groups that hold in `before` and not in `after`."""
    was = rule_compliance(before)
    now = rule_compliance(after)
    return frozenset(
        k
        for k, c in now.items()
        if c.required and not c.satisfied and (k not in was or was[k].satisfied)
    )
