"""The API's Backend (operations.backend.Backend) over the coordinator's store, cache,
planner and election: the domain verbs the API nouns call, in the daemon and in tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import MappingProxyType
from typing import TypeVar

from hvplace.coordinator import cache as kinds
from hvplace.coordinator.admission import AdmissionCheck
from hvplace.coordinator.cache import Cache
from hvplace.coordinator.election import Election
from hvplace.coordinator.operations.backend import ClusterView, EtcdChange, Leadership
from hvplace.coordinator.planner import Outcome, Planner
from hvplace.coordinator.store import Fence, Store, Txn
from hvplace.proto.records import VM

T = TypeVar("T")


class CoreBackend:
    """operations.backend.Backend over this package's store, cache, planner and election.
    Every write is fenced with the current leader's token."""

    def __init__(
        self, store: Store, cache: Cache, planner: Planner, election: Election | None
    ) -> None:
        self.store = store
        self.cache = cache
        self.planner = planner
        self.election = election
        self._view: ClusterView | None = None

    def _fence(self) -> Fence | None:
        return self.election.require_fence() if self.election is not None else None

    def view(self) -> ClusterView:
        c = self.cache
        if self._view is None or self._view.revision != c.revision:
            self._view = ClusterView(
                revision=c.revision,
                snapshot=c.snapshot(),
                # Read-only views of the cache's tables (O(1), not a copy of 100,000
                # records per revision): read them before the next await; the specs
                # are the snapshot's immutable map.
                hosts=MappingProxyType(c.hosts.records),
                host_status=MappingProxyType(c.host_status.records),
                vms=c.snapshot().vms,
                vm_status=MappingProxyType(c.vm_status.records),
                assignments=MappingProxyType(c.assignments.records),
                domains=MappingProxyType(c.domains.records),
                rules=dict(c.rules.records),
                policies=dict(c.policies.records),
                config=c.cluster_config(),
            )
        return self._view

    async def fresh_view(self) -> ClusterView:
        await self.cache.fresh()
        return self.view()

    def leadership(self) -> Leadership:
        e = self.election
        if e is None:
            return Leadership(is_leader=True, leader="standalone")
        fence = e.fence
        return Leadership(
            is_leader=fence is not None,
            leader=e.leader,
            fencing_token=fence.revision if fence is not None else 0,
        )

    async def read(self, key: str) -> bytes | None:
        kv = await self.store.get(key)
        return None if kv is None else kv.value

    async def read_prefix(self, prefix: str) -> list[bytes]:
        kvs, _revision = await self.store.list_prefix(prefix)
        return [kv.value for kv in kvs]

    async def update(
        self, fn: Callable[[Txn], Awaitable[T]], *, subject: str, hold_placement: bool = False
    ) -> T:
        if hold_placement:
            async with self.planner.held():
                return await self._update(fn, subject)
        return await self._update(fn, subject)

    async def _update(self, fn: Callable[[Txn], Awaitable[T]], subject: str) -> T:
        done = await self.store.update(fn, fence=self._fence(), subject=subject)
        if done.revision:
            await self.cache.wait_for_revision(done.revision)
        return done.result

    def txn(self) -> Txn:
        return Txn(self.store)

    async def place(
        self,
        vms: Sequence[VM],
        *,
        atomic: bool,
        admission: AdmissionCheck | None,
        txn: Txn,
    ) -> Outcome:
        self._fence()  # refuse early on a standby
        return await self.planner.place_and_commit(vms, atomic=atomic, admission=admission, txn=txn)

    async def changes(self) -> AsyncIterator[EtcdChange]:
        async for c in self.cache.subscribe():
            if c.type == kinds.RESYNC:
                continue
            yield EtcdChange(revision=c.revision, type=c.type, key=c.key, value=c.value)
