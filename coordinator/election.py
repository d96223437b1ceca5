"""Leader election on etcd (the recipe of etcd's concurrency/election.go): a session lease, a
key per candidate, the lowest create revision leads, its create revision is the fencing token."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from hvplace.coordinator.store import Compare, Fence, Store, WatchBatch, WatchStream
from hvplace.proto import keyspace
from hvplace.proto.errors import Interrupted, Unavailable

log = logging.getLogger(__name__)

LeaderWork = Callable[[Fence], Coroutine[Any, Any, None]]


class Election:
    """Campaigns forever; while leading, runs `leader_work(fence)` as one task and cancels
    it before anything else when the session is lost (Nomad leader.go establish/revoke).

    The session counts as lost when etcd says the lease is gone, when no renewal has
    succeeded for a whole TTL by our own clock (so a process frozen past its TTL steps
    down on waking, before it writes), or when a fenced write was rejected. With
    `self_checks` off only the last applies (the fence is the safety net either way)."""

    def __init__(
        self,
        store: Store,
        node_name: str,
        ttl_s: float,
        leader_work: LeaderWork,
        *,
        clock: Callable[[], float] = time.monotonic,
        self_checks: bool = True,
    ) -> None:
        self.store = store
        self.self_checks = self_checks
        self.node_name = node_name
        self.ttl_s = ttl_s
        self.leader_work = leader_work
        self.clock = clock
        self.fence: Fence | None = None
        self.leader = ""
        self.terms = 0
        self.on_change: Callable[[bool], None] | None = None
        self._lost = asyncio.Event()
        self._stopping = False
        store.on_fence_lost = self._fence_rejected

    @property
    def is_leader(self) -> bool:
        return self.fence is not None

    def require_fence(self) -> Fence:
        fence = self.fence
        if fence is None:
            raise Interrupted(
                f"this coordinator ({self.node_name}) is not the leader"
                + (f"; the leader is {self.leader}" if self.leader else "")
            )
        return fence

    def _fence_rejected(self, fence: Fence) -> None:
        if self.fence is not None and fence == self.fence:
            log.warning("a write was rejected by the fence: stepping down")
            self._lost.set()

    def stop(self) -> None:
        self._stopping = True
        self._lost.set()

    async def run(self) -> None:
        """Campaign, lead, step down, campaign again, until cancelled or stopped."""
        while not self._stopping:
            try:
                await self._session()
            except Unavailable as e:
                log.warning("election: etcd unavailable: %s", e)
            if not self._stopping:
                await asyncio.sleep(min(1.0, self.ttl_s / 5))

    async def _session(self) -> None:
        lease = await self.store.grant(self.ttl_s)
        self._lost = asyncio.Event()
        renewed = self.clock()
        keeper = asyncio.create_task(self._keep(lease, renewed), name="hvplace-session")
        try:
            key = f"{keyspace.ELECTION}{lease:x}"
            await self.store.commit(
                [Compare.absent(key)], {key: self.node_name.encode()}, fence=None, lease=lease
            )
            mine = await self.store.get(key)
            if mine is None:
                return  # the lease expired already
            fence = Fence(key, mine.create_revision)
            log.info("campaigning as %s (token %d)", key, fence.revision)
            if not await self._wait_turn(fence):
                return
            await self._lead(fence)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            # Resign: our key goes at once so a standby need not wait for the TTL.
            await self.store.revoke(lease)

    async def _keep(self, lease: int, renewed: float) -> None:
        period = self.ttl_s / 3
        delay = period
        while True:
            await asyncio.sleep(delay)
            if self.self_checks and self.clock() - renewed >= self.ttl_s:
                log.warning(
                    "session not renewed for %.1fs (TTL %ss): lost",
                    self.clock() - renewed,
                    self.ttl_s,
                )
                self._lost.set()
                return
            try:
                ttl = await self.store.keepalive(lease, timeout_s=period)
            except Unavailable as e:
                log.warning("session renewal failed: %s", e)
                # The store has moved to another etcd member: try it soon, not a period later.
                delay = min(period, 0.2)
                continue
            delay = period
            if ttl <= 0 and not self.self_checks:
                log.warning(
                    "session lease %x expired in etcd; self checks off: the fence decides", lease
                )
                continue
            if ttl <= 0:
                log.warning("session lease %x expired in etcd: lost", lease)
                self._lost.set()
                return
            renewed = self.clock()

    async def _wait_turn(self, fence: Fence) -> bool:
        """Wait until no candidate key older than ours remains; False if the session went.

        A watch on the election keys wakes us as soon as the leader's key goes (etcd's
        election waits on its predecessor's delete the same way), so a standby takes
        over at the expiry of the leader's lease, not up to a poll period later; the
        poll stays as a fallback if the watch breaks."""
        poll = min(0.25, self.ttl_s / 10)
        stream: WatchStream | None = None
        with contextlib.suppress(Unavailable, TimeoutError):
            stream = await self.store.watch(keyspace.ELECTION, fence.revision + 1)
        lost = asyncio.ensure_future(self._lost.wait())
        changed: asyncio.Future[WatchBatch] | None = None
        try:
            while not self._lost.is_set():
                first = await self.store.first_created(keyspace.ELECTION)
                if first is not None and first.key == fence.key:
                    return True
                self.leader = first.value.decode() if first is not None else ""
                before = await self.store.last_created_before(keyspace.ELECTION, fence.revision)
                if before is None and first is not None and first.key != fence.key:
                    return False  # our key is gone (lease expired): start a new session
                if stream is not None and changed is None:
                    changed = asyncio.ensure_future(anext(stream))
                waiting: set[asyncio.Future[Any]] = {lost, *([changed] if changed else [])}
                done, _ = await asyncio.wait(waiting, timeout=1.0 if changed else poll)
                if changed is not None and changed in done:
                    if changed.exception() is not None:
                        stream = None  # broken: poll from now on
                    changed = None
            return False
        finally:
            lost.cancel()
            if changed is not None:
                changed.cancel()
                with contextlib.suppress(BaseException):
                    await changed
            if stream is not None:
                await stream.close()

    async def _lead(self, fence: Fence) -> None:
        self.terms += 1
        self.fence = fence
        self.leader = self.node_name
        log.info("elected leader (token %d)", fence.revision)
        if self.on_change is not None:
            self.on_change(True)
        work = asyncio.create_task(self.leader_work(fence), name="hvplace-leader-work")
        lost = asyncio.create_task(self._lost.wait())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Revoke before anything else: from here no caller gets the fence and every
            # leader task is cancelled before the next campaign.
            self.fence = None
            self.leader = ""
            work.cancel()
            lost.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            if self.on_change is not None:
                self.on_change(False)
        if work.done() and not work.cancelled() and work.exception() is not None:
            log.error("leader work failed: %r; stepping down", work.exception())
        log.info("lost leadership (token %d)", fence.revision)
