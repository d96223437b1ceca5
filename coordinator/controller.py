"""The leader's level-triggered work queue (k8s sample-controller): cache changes queue work
items; each sync re-reads the cache, so it is idempotent; a periodic resync catches the rest."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from hvplace.coordinator import cache as kinds
from hvplace.coordinator import failure
from hvplace.coordinator.cache import Cache, Change
from hvplace.coordinator.metrics import CoordinatorMetrics
from hvplace.coordinator.migration import Migrations
from hvplace.coordinator.migration import interesting as migration_change
from hvplace.coordinator.placement.admission import warm
from hvplace.coordinator.planner import Outcome, Planner
from hvplace.coordinator.restarts import Restarts
from hvplace.coordinator.store import Compare, Fence, FenceLost, Store
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import Busy, Conflict, Unavailable
from hvplace.proto.records import VM, ClusterConfig, HostState, HostStatus, Phase, VMStatus

log = logging.getLogger(__name__)

HOSTS = "hosts"
"""Work item: host registrations vs statuses (lost / back), then failover when due."""
PENDING = "pending"
"""Work item: place every VM that has no assignment."""
RESTARTS = "restarts"
"""Work item: VMs whose start failed on their host (coordinator/restarts.py)."""
MIGRATIONS = "migrations"
"""Work item: settle live migrations from the agents' reports (coordinator/migration.py)."""
METRICS_EVERY_S = 1.0
"""The gauges' period (hosts by state, VMs by phase, pending by reason)."""

# What a change can unblock or require.
_TRIGGERS: dict[str, tuple[str, ...]] = {
    kinds.HOSTS: (HOSTS, PENDING),
    kinds.HOST_STATUS: (HOSTS, PENDING),
    kinds.VMS: (PENDING,),
    kinds.ASSIGNMENTS: (PENDING,),
    kinds.RULES: (PENDING, HOSTS),
    kinds.POLICIES: (PENDING, HOSTS),
    kinds.CONFIG: (HOSTS,),
    kinds.RESYNC: (HOSTS, PENDING),
    kinds.MIGRATIONS: (HOSTS, PENDING),
}


class Controller:
    """Runs while this coordinator leads; `run(fence)` is the election's leader work."""

    def __init__(
        self,
        store: Store,
        cache: Cache,
        planner: Planner,
        *,
        cluster_default: ClusterConfig,
        resync_s: float = 30.0,
        batch_size: int = 500,
        metrics: CoordinatorMetrics | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache = cache
        self.planner = planner
        self.cluster_default = cluster_default
        self.resync_s = resync_s
        self.batch_size = batch_size
        self.metrics = metrics
        self.wall = wall
        self._queue: set[str] = set()
        self._wake = asyncio.Event()
        self._fence: Fence | None = None
        self._office = 0.0  # when this leader took office (wall clock)
        self._timers: set[asyncio.TimerHandle] = set()
        self.failovers = 0
        self.restarts = Restarts(store, cache, planner, wall=wall)
        self.migrations = Migrations(store, cache, planner, clock=wall)

    def enqueue(self, item: str) -> None:
        self._queue.add(item)
        self._wake.set()

    def _on_change(self, change: Change) -> None:
        for item in _TRIGGERS.get(change.kind, ()):
            self.enqueue(item)
        if self.restarts.notice(change):
            self.enqueue(RESTARTS)
        if self.cache.migrations.records and migration_change(
            change, list(self.cache.migrations.records)
        ):
            self.enqueue(MIGRATIONS)

    async def run(self, fence: Fence) -> None:
        self._fence = fence
        self._office = self.wall()
        remove = self.cache.add_listener(self._on_change)
        resync = asyncio.create_task(self._resync_loop(), name="hvplace-resync")
        gauges = asyncio.create_task(self._metrics_loop(), name="hvplace-gauges")
        try:
            await self.cache.fresh()
            warm(self.cache.snapshot())  # the first create need not build the host table
            await self._ensure_cluster_config()
            self.restarts.resync()
            for item in (HOSTS, PENDING, RESTARTS, MIGRATIONS):
                self.enqueue(item)
            backoff = 0.1
            while True:
                await self._wake.wait()
                self._wake.clear()
                items, self._queue = self._queue, set()
                for item in sorted(items, key=_ORDER.__getitem__):
                    try:
                        await self.sync(item)
                        backoff = 0.1
                    except FenceLost:
                        raise
                    except (Busy, Unavailable) as e:
                        log.warning("sync %s failed: %s; retrying in %.1fs", item, e, backoff)
                        self._later(backoff, item)
                        backoff = min(backoff * 2, 5.0)
        finally:
            remove()
            resync.cancel()
            gauges.cancel()
            for t in self._timers:
                t.cancel()
            self._timers.clear()
            self._fence = None

    def _later(self, delay: float, item: str) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self.enqueue(item)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_s)
            self.restarts.resync()
            for item in (HOSTS, PENDING, RESTARTS, MIGRATIONS):
                self.enqueue(item)

    async def _metrics_loop(self) -> None:
        """The gauges on their own period, off the request and watch paths: each refresh
        reads counters the cache keeps per event (O(hosts), not O(VMs))."""
        while True:
            if self.metrics is not None:
                try:
                    self.metrics.refresh_state(self.cache)
                except Exception:  # a gauge must never stop the leader's work
                    log.exception("refreshing the gauges failed")
            await asyncio.sleep(METRICS_EVERY_S)

    async def sync(self, item: str) -> None:
        if item == HOSTS:
            await self.sync_hosts()
        elif item == PENDING:
            await self.sync_pending()
        elif item == RESTARTS:
            await self.restarts.sync()
        elif item == MIGRATIONS:
            wake = await self.migrations.settle()
            if wake is not None:
                self._later(wake, MIGRATIONS)

    async def _ensure_cluster_config(self) -> None:
        if self.cache.config is not None:
            return
        cfg = codec.dumps(self.cluster_default)
        rev = await self.store.commit(
            [Compare.absent(keyspace.CONFIG)], {keyspace.CONFIG: cfg}, fence=self._fence
        )
        if rev:
            log.info("wrote the cluster config record")
            await self.cache.wait_for_revision(rev)

    # ------------------------------------------------------------------ hosts

    async def sync_hosts(self) -> None:
        """Derive host states from the records: an unregistered host that assignments or
        statuses name goes `lost` when failure.lost_at says; a lost host registered again
        goes `ready`. Then re-place the VMs of lost hosts once `failover_delay_s` passed."""
        cache = self.cache
        now = self.wall()
        ttl = cache.cluster_config().lease_ttl_s
        writes: dict[str, bytes] = {}
        compares: list[Compare] = []
        wait = None
        due = failure.lost_at(
            cache.unregistered(),
            cache.host_status.records,
            cache.gone_at,
            office_since=self._office,
            lease_ttl_s=ttl,
        )
        for name, at in sorted(due.items()):
            if at > now:
                wait = at - now if wait is None else min(wait, at - now)
                continue
            seen = name in cache.gone_at
            reason = (
                "lease expired"
                if seen
                else f"not registered for {ttl:g}s after this coordinator took office"
            )
            lost = HostStatus(name=name, state=HostState.LOST, reason=reason, since=at)
            writes[keyspace.host_status(name)] = codec.dumps(lost)
            compares.append(
                Compare.unchanged(keyspace.host_status(name), cache.host_status.revs.get(name, 0))
            )
            # The registration must still be absent when this commits.
            compares.append(Compare.absent(keyspace.host(name)))
            log.warning("host %s lost: %s", name, reason)
        if wait is not None:
            self._later(wait, HOSTS)
        back: list[str] = []
        for name, status in cache.host_status.records.items():
            if status.state is HostState.LOST and name in cache.hosts.records:
                ready = HostStatus(
                    name=name, state=HostState.READY, reason="registered again", since=now
                )
                writes[keyspace.host_status(name)] = codec.dumps(ready)
                compares.append(
                    Compare.unchanged(keyspace.host_status(name), cache.host_status.revs[name])
                )
                back.append(name)
                log.info("host %s is back", name)
        writes.update(self._returned_vms(back, now))
        if writes:
            rev = await self.store.commit(compares, writes, fence=self._fence)
            if not rev:
                raise Busy("host status changed concurrently")
            await cache.wait_for_revision(rev)
        await self._failover()

    def _returned_vms(self, hosts: list[str], now: float) -> dict[str, bytes]:
        """Statuses of VMs that kept their assignment on a host that is back (HA `off`:
        never restarted elsewhere): its agent starts them again, and the API says so."""
        if not hosts:
            return {}
        back = set(hosts)
        writes: dict[str, bytes] = {}
        for key, a in self.cache.assignments.records.items():
            if a.host not in back:
                continue
            status = self.cache.vm_status.records.get(key)
            if status is None or status.phase is not Phase.PENDING:
                continue
            scheduled = VMStatus(
                scope=a.vm.scope,
                name=a.vm.name,
                phase=Phase.SCHEDULED,
                reason=f"host {a.host} is back",
                host=a.host,
                epoch=a.epoch,
                since=now,
            )
            writes[keyspace.vm_status(a.vm.scope, a.vm.name)] = codec.dumps(scheduled)
        return writes

    async def _failover(self) -> None:
        cache = self.cache
        delay = cache.cluster_config().failover_delay_s
        now = self.wall()
        with_vms = cache.assigned_hosts
        due: list[str] = []
        wait = None
        for name, status in cache.host_status.records.items():
            if status.state is not HostState.LOST or name in cache.hosts.records:
                continue
            if name not in with_vms:
                continue
            # A registration seen to go again after the host was marked lost (it came back
            # and went) restarts the delay.
            since = max(status.since, cache.gone_at.get(name, 0.0))
            left = since + delay - now
            if left > 0:
                wait = left if wait is None else min(wait, left)
            else:
                due.append(name)
        if wait is not None:
            self._later(wait, HOSTS)
        if not due:
            return
        try:
            outcome = await self.planner.replace_lost(sorted(due))
        except Conflict as e:
            # A host registered again before the failover committed: it keeps its VMs.
            log.info("failover of %s not committed: %s", ", ".join(sorted(due)), e)
            self.enqueue(HOSTS)
            return
        self._observe(outcome)
        plan = outcome.plan
        if plan.assignments:
            self.failovers += 1
            for name in due:
                since = cache.host_status.records[name].since
                if self.metrics is not None:
                    self.metrics.failover.observe(max(0.0, self.wall() - since))
        log.info(
            "failover of %s: %d VMs re-placed, %d pending",
            ", ".join(sorted(due)),
            len(plan.assignments),
            len(plan.pending),
        )

    # ------------------------------------------------------------------ pending

    def unassigned(self) -> list[VM]:
        """VMs to place; a VM `failed` after its start attempts waits for `vm start`."""
        specs = self.cache.vms.records
        statuses = self.cache.vm_status.records
        # The cache keeps the unassigned set per event: this costs O(pending), not O(VMs).
        return [
            specs[key]
            for key in sorted(self.cache.unassigned)
            if key not in self.cache.migrations.records  # a cold move places it itself
            and ((st := statuses.get(key)) is None or st.phase is not Phase.FAILED)
        ]

    async def sync_pending(self) -> None:
        """Place every VM without an assignment, in batches; those that cannot be placed
        keep their reasons (VMStatus) until a host, capacity or rule change retries them."""
        todo = self.unassigned()
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i : i + self.batch_size]
            # Re-read: a spec may have changed or gone while the previous batch committed.
            live = [self.cache.vms.records.get(vm.key) for vm in batch]
            current = [
                vm for vm in live if vm is not None and vm.key not in self.cache.assignments.records
            ]
            if not current:
                continue
            outcome = await self.planner.place_and_commit(current, atomic=False)
            self._observe(outcome)
            plan = outcome.plan
            if plan.assignments:
                log.info(
                    "placed %d pending VMs (%d still pending)",
                    len(plan.assignments),
                    len(plan.pending),
                )

    def _observe(self, outcome: Outcome) -> None:
        if self.metrics is None or not outcome.revision:
            return
        plan = outcome.plan
        # Pending VMs are a gauge (by reason): re-tries would inflate a counter.
        self.metrics.placements.labels(result="placed").inc(len(plan.assignments))


_ORDER = {HOSTS: 0, MIGRATIONS: 1, RESTARTS: 2, PENDING: 3}
