"""The API's Backend (operations.Backend) over the coordinator's store, cache, planner and
election: what the gRPC API's Operations call, in the daemon and in tests alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from types import MappingProxyType

from hvplace.coordinator import cache as kinds
from hvplace.coordinator.cache import Cache
from hvplace.coordinator.election import Election
from hvplace.coordinator.operations import Change as ApiChange
from hvplace.coordinator.operations import ClusterView, Leadership
from hvplace.coordinator.placement import Plan
from hvplace.coordinator.planner import Planner
from hvplace.coordinator.snapshot import Snapshot
from hvplace.coordinator.store import Compare, Fence, Store
from hvplace.proto.models import VM


class CoreBackend:
    """operations.Backend over this package's store, cache, planner and election: what the
    gRPC API's Operations call. Every write is fenced with the current leader's token."""

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

    async def get(self, key: str) -> tuple[bytes, int] | None:
        kv = await self.store.get(key)
        return None if kv is None else (kv.value, kv.mod_revision)

    async def list_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        kvs, _revision = await self.store.list_prefix(prefix)
        return [(kv.key, kv.value) for kv in kvs]

    async def commit(
        self,
        compares: Sequence[tuple[str, int]],
        puts: Sequence[tuple[str, bytes]],
        deletes: Sequence[str] = (),
    ) -> bool:
        rev = await self.store.commit(
            [Compare.unchanged(k, r) for k, r in compares],
            dict(puts),
            list(deletes),
            fence=self._fence(),
        )
        if rev:
            await self.cache.wait_for_revision(rev)
        return bool(rev)

    async def place_and_commit(
        self,
        vms: Sequence[VM],
        atomic: bool,
        extra_puts: Sequence[tuple[str, bytes]],
        extra_absent: Sequence[str],
        check: Callable[[Snapshot, Plan], None] | None = None,
        extra_unchanged: Sequence[tuple[str, int]] = (),
    ) -> Plan:
        self._fence()  # refuse early on a standby
        return await self.planner.place_and_commit(
            vms,
            atomic=atomic,
            extra_puts=dict(extra_puts),
            extra_compares=[
                *(Compare.absent(k) for k in extra_absent),
                *(Compare.unchanged(k, r) for k, r in extra_unchanged),
            ],
            check=check,
        )

    async def changes(self) -> AsyncIterator[ApiChange]:
        async for c in self.cache.subscribe():
            if c.type == kinds.RESYNC:
                continue
            yield ApiChange(revision=c.revision, type=c.type, key=c.key, value=c.value)
