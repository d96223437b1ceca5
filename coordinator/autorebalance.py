"""The leader's rebalancer loop (SPEC §5.2): degraded VMs repaired by moving as few VMs as
possible, within a budget of moves per interval, as soon as capacity returns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from hvplace.coordinator import cache as kinds
from hvplace.coordinator.cache import Cache, Change
from hvplace.coordinator.placement.rebalance import plan_rebalance
from hvplace.coordinator.rebalance import Mover, MoveView, carry_out, with_degraded
from hvplace.coordinator.store import FenceLost

log = logging.getLogger(__name__)

_WAKE = frozenset({kinds.HOSTS, kinds.HOST_STATUS, kinds.RULES, kinds.POLICIES, kinds.RESYNC})
"""Changes after which a repair may have become possible (capacity or rules)."""


class AutoRebalancer:
    """The leader's loop: at most `max_moves` repair moves per `interval_s`, planned when
    a host, a host status or a rule changes (capacity returned) and at every interval."""

    def __init__(
        self,
        cache: Cache,
        mover: Mover,
        *,
        interval_s: float = 30.0,
        max_moves: int = 2,
        repair_interrupted: Callable[[], object] | None = None,
    ) -> None:
        self.cache = cache
        self.mover = mover
        self.interval_s = interval_s
        self.max_moves = max_moves
        self.repair_interrupted = repair_interrupted
        self.moves = 0
        self.failed = 0

    async def run(self) -> None:
        """Until cancelled (leadership lost). A pass that moved something is followed by
        the rest of its interval (the budget); one that moved nothing waits for a change
        or the interval."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def on_change(change: Change) -> None:
            if change.kind in _WAKE:
                wake.set()

        remove = self.cache.add_listener(on_change)
        try:
            while True:
                started = loop.time()
                wake.clear()
                try:
                    moved = await self.once()
                except FenceLost:
                    raise
                except Exception:
                    # A failed pass must not end the leader's other work; retried later.
                    log.exception("rebalancer pass failed")
                    moved = [MoveView("", "", "")]
                if moved:
                    await asyncio.sleep(max(0.0, started + self.interval_s - loop.time()))
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):
                        await wake.wait()
        finally:
            remove()

    async def once(self) -> list[MoveView]:
        """One pass: repair what the planner can within the budget."""
        if self.repair_interrupted is not None:
            fixed = self.repair_interrupted()
            if asyncio.iscoroutine(fixed):
                await fixed
        await self.cache.fresh()
        snapshot = with_degraded(self.cache.snapshot(), self.cache.vm_status.records)
        plan = plan_rebalance(snapshot, self.max_moves, improve=False)
        if not plan.moves:
            return []
        log.info("rebalancer: %d move(s) to repair %s", len(plan.moves), ", ".join(plan.broken))
        done = await carry_out(self.mover, plan.moves, detach=False)
        self.moves += sum(1 for m in done if m.done)
        self.failed += sum(1 for m in done if not m.done)
        return done


_WAKE = frozenset({kinds.HOSTS, kinds.HOST_STATUS, kinds.RULES, kinds.POLICIES, kinds.RESYNC})
