"""Drain: empty a host for maintenance by moving every VM off it, a bounded number at once,
each through `Migrations.migrate_vm` (live; cold restart where the VM's setting allows),
so every required rule holds throughout; the host ends `drained`.

`plan_drain` (pure) is the dry run: the moves in order and what would stay, each VM
placed against the snapshot with the moves before it applied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hvplace.coordinator.cache import Cache
from hvplace.coordinator.migration import MigrationFailed, Migrations
from hvplace.coordinator.placement.engine import ha_order
from hvplace.coordinator.placement.moves import choose_target
from hvplace.coordinator.snapshot import Snapshot
from hvplace.coordinator.store import Compare, Store
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import Busy, Conflict, InvalidInput, NotFound, Unavailable
from hvplace.proto.names import check_name
from hvplace.proto.records import HostState, HostStatus, MigrationPolicy

PARALLEL = 2
"""Migrations at once (vSphere: 8 vMotions per host; Proxmox's bulk migrate defaults to
1 worker): two keep a small host's network and CPU from stalling the guests."""
MAX_PARALLEL = 16


@dataclass(frozen=True, slots=True)
class Progress:
    """One line of a drain's progress (`vm` empty on the host's own lines)."""

    vm: str
    from_host: str
    to_host: str
    state: str  # planned | stays | migrating | migrated | restarted | failed | drained | draining
    reason: str = ""
    done: int = 0
    total: int = 0


def plan_drain(snapshot: Snapshot, host: str) -> list[Progress]:
    """The dry run: each VM of `host` in HA order, its target or why it would stay; the
    targets chosen so far count (as the real drain's reservations do)."""
    keys = [k for k, h in snapshot.placements.items() if h == host and k in snapshot.vms]
    vms = ha_order(snapshot.vms[k] for k in keys)
    hosts = dict(snapshot.hosts)
    if host in hosts and hosts[host].state is HostState.READY:
        hosts[host] = dataclasses.replace(hosts[host], state=HostState.DRAINING)
    snap = dataclasses.replace(snapshot, hosts=hosts)
    out: list[Progress] = []
    placements = dict(snap.placements)
    for i, vm in enumerate(vms, 1):
        choice = choose_target(dataclasses.replace(snap, placements=placements), vm.key)
        if choice.host is None:
            why = choice.explanation.summary()
            out.append(Progress(vm.key, host, "", "stays", why, i, len(vms)))
            continue
        placements[vm.key] = choice.host
        how = "restart" if vm.migration is MigrationPolicy.RESTART else "live"
        out.append(Progress(vm.key, host, choice.host, "planned", how, i, len(vms)))
    return out


class Drain:
    """Runs a drain; progress comes back as an async iterator of `Progress`."""

    def __init__(self, store: Store, cache: Cache, migrations: Migrations) -> None:
        self.store = store
        self.cache = cache
        self.migrations = migrations

    async def _set_state(self, host: str, state: HostState, reason: str) -> None:
        key = keyspace.host_status(host)
        for _attempt in range(5):
            kv = await self.store.get(key)
            current = codec.loads(HostStatus, kv.value) if kv is not None else None
            if current is not None and current.state is HostState.LOST:
                raise Conflict(f"host {host} is lost; it takes a new state when its agent returns")
            status = HostStatus(name=host, state=state, reason=reason, since=time.time())
            revision = await self.store.commit(
                [Compare.unchanged(key, kv.mod_revision if kv is not None else 0)],
                {key: codec.dumps(status)},
                fence=self.migrations.planner.fence(),
            )
            if revision:
                await self.cache.wait_for_revision(revision)
                return
        raise Busy(f"host {host} status kept changing; retry")

    def _vms_on(self, host: str) -> list[str]:
        return sorted(k for k, a in self.cache.assignments.records.items() if a.host == host)

    async def run(
        self, host: str, *, dry_run: bool = False, parallel: int = PARALLEL
    ) -> AsyncIterator[Progress]:
        check_name(host, "host name")
        if not 0 <= parallel <= MAX_PARALLEL:
            raise InvalidInput(f"parallel {parallel}: use 1 to {MAX_PARALLEL} (0: {PARALLEL})")
        parallel = parallel or PARALLEL
        await self.cache.fresh()
        cache = self.cache
        known = host in cache.hosts.records or host in cache.host_status.records
        if not known:
            raise NotFound(f"host {host} is not registered")
        if dry_run:
            for line in plan_drain(self.migrations.planner.snapshot(), host):
                yield line
            return
        await self._set_state(host, HostState.DRAINING, "draining: moving its VMs away")
        todo = self._vms_on(host)
        total = len(todo)
        yield Progress("", host, "", "draining", f"{total} VM(s) to move", 0, total)
        queue: asyncio.Queue[Progress | None] = asyncio.Queue()
        slots = asyncio.Semaphore(parallel)
        done = 0

        async def move(key: str) -> None:
            nonlocal done
            async with slots:
                vm = cache.vms.records.get(key)
                a = cache.assignments.records.get(key)
                if vm is None or a is None or a.host != host:
                    done += 1
                    return
                policy = vm.migration
                restart = policy is MigrationPolicy.RESTART
                await queue.put(
                    Progress(
                        key, host, "", "restarting" if restart else "migrating", "", done, total
                    )
                )
                state, to, why = await self._move_one(key, restart, policy)
                done += 1
                await queue.put(Progress(key, host, to, state, why, done, total))

        workers = [asyncio.ensure_future(move(k)) for k in ha_keys(cache, todo)]
        finished = asyncio.ensure_future(asyncio.gather(*workers))
        finished.add_done_callback(lambda _f: queue.put_nowait(None))
        try:
            while (item := await queue.get()) is not None:
                yield item
            await finished
        finally:
            for w in workers:
                w.cancel()
        left = self._vms_on(host)
        if left:
            yield Progress(
                "",
                host,
                "",
                "draining",
                f"{len(left)} VM(s) stay: {', '.join(left[:5])}; the host stays draining",
                total - len(left),
                total,
            )
            return
        await self._set_state(
            host, HostState.DRAINED, "drained: no VM left; uncordon returns it to service"
        )
        yield Progress("", host, "", "drained", "no VM left", total, total)

    async def _move_one(
        self, key: str, restart: bool, policy: MigrationPolicy
    ) -> tuple[str, str, str]:
        scope, name = key.split("/", 1)
        try:
            result = await self.migrations.migrate_vm(scope, name, restart=restart)
            return ("restarted" if restart else "migrated"), result.target, f"{result.seconds:.2f}s"
        except (MigrationFailed, Unavailable, Conflict, Busy, NotFound) as e:
            if restart or policy is not MigrationPolicy.LIVE_OR_RESTART:
                return "failed", "", e.message
            first = e.message
        try:
            result = await self.migrations.migrate_vm(scope, name, restart=True)
        except (MigrationFailed, Unavailable, Conflict, Busy, NotFound) as e:
            return "failed", "", f"{first}; cold restart: {e.message}"
        return "restarted", result.target, f"live failed ({first}); restarted"


def ha_keys(cache: Cache, keys: list[str]) -> list[str]:
    """Keys in HA order: high priority VMs move first."""
    vms = [cache.vms.records[k] for k in keys if k in cache.vms.records]
    return [vm.key for vm in ha_order(vms)]
