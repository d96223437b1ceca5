"""The rebalancer's `Mover`s (coordinator/rebalance.py): `LiveMover` (the daemon's: live
migration, cold per VM setting) and `ColdMover`, a fenced cold re-assignment (stop on the
old host, then assign to the new one).

The cold move keeps a VM from ever running on two hosts: its old host must first report
it stopped at a fresh epoch (written by this move, so the report cannot predate it), or
have lost its registration (its agent fenced itself); the re-assignment's transaction
compares that report (or the registration's absence) and the assignment it read, so a
domain started again meanwhile, or any other change, aborts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from hvplace.coordinator import cache as kinds
from hvplace.coordinator.cache import Cache, Change
from hvplace.coordinator.migration import Migrations
from hvplace.coordinator.placement import Batch, Plan, place, rule_compliance
from hvplace.coordinator.planner import Planner
from hvplace.coordinator.snapshot import Snapshot
from hvplace.coordinator.store import Compare, Store, Txn
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import Busy, Conflict, NotFound, Unavailable
from hvplace.proto.records import (
    TOPOLOGY_HOST,
    VM,
    Assignment,
    DomainState,
    MigrationPolicy,
    Phase,
    Power,
    VMStatus,
)
from hvplace.proto.selectors import LabelExpression, NodeAffinity, NodeSelectorTerm, Op

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 120.0
"""How long a cold move waits for the old host to report the VM stopped."""
MOVING = "moving to "
"""Start of the status reason while a cold move stops a VM on its old host."""
_ACTIVE = (DomainState.RUNNING, DomainState.PAUSED)


def pinned(vm: VM, target: str) -> VM:
    """The VM with its required node affinity narrowed to `target`."""
    expr = LabelExpression(key=TOPOLOGY_HOST, operator=Op.IN, values=(target,))
    terms = tuple(
        dataclasses.replace(t, match_expressions=(*t.match_expressions, expr))
        for t in vm.node_affinity.required
    ) or (NodeSelectorTerm(match_expressions=(expr,)),)
    return dataclasses.replace(vm, node_affinity=NodeAffinity(terms, vm.node_affinity.preferred))


def place_on(snapshot: Snapshot, vm: VM, target: str) -> Plan:
    """The engine's verdict on `vm` moving to `target` (every required rule, capacity,
    node affinity, host state), as if it were lifted off its host first (pure)."""
    others = {k: h for k, h in snapshot.placements.items() if k != vm.key}
    snap = dataclasses.replace(snapshot, placements=others)
    return place(snap, Batch((pinned(vm, target),)))


class ColdMover:
    """`Mover` by fenced cold re-assignment (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        cache: Cache,
        planner: Planner,
        *,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache = cache
        self.planner = planner
        self.stop_timeout_s = stop_timeout_s
        self.wall = wall
        self.inflight: set[str] = set()

    async def move(self, vm: str, target: str) -> None:
        if vm in self.inflight:
            raise Busy(f"VM {vm} is already moving")
        self.inflight.add(vm)
        try:
            await self._move(vm, target)
        finally:
            self.inflight.discard(vm)

    def _check(self, key: str, target: str) -> tuple[VM, Assignment]:
        cache = self.cache
        spec = cache.vms.records.get(key)
        if spec is None:
            raise NotFound(f"VM {key} does not exist")
        a = cache.assignments.records.get(key)
        if a is None:
            raise Conflict(f"VM {key} is not placed; the controller places it")
        plan = place_on(cache.snapshot(), spec, target)
        if key not in plan.assignments:
            why = plan.pending.get(key)
            raise Conflict(
                f"VM {key} cannot move to {target}: {why.summary() if why else 'refused'}"
            )
        return spec, a

    async def _move(self, key: str, target: str) -> None:
        cache = self.cache
        await cache.fresh()
        spec, a = self._check(key, target)
        if a.host == target:
            return
        source = a.host
        # Committed only if the source still reports the domain stopped as read, or, with
        # no registration, its agent lost its lease and fenced itself.
        preconditions = Txn(self.store)
        domain = cache.domains.records.get(key)
        if source in cache.hosts.records:
            await self._stop_on_source(spec, a, target)
            domain = cache.domains.records.get(key)
        if source in cache.hosts.records and domain is not None and domain.host == source:
            preconditions.require_revision(
                keyspace.domain(source, spec.scope, spec.name), cache.domains.revs.get(key, 0)
            )
        else:
            preconditions.require_absent(keyspace.host(source))

        def compute(snap: Snapshot) -> tuple[Plan, Sequence[VM]]:
            current = snap.vms.get(key)
            if current is None or snap.placements.get(key) != source:
                return Plan(revision=snap.revision), []
            return place_on(snap, current, target), [current]

        try:
            outcome = await self.planner.commit_with(
                compute, write_specs=False, atomic=False, txn=preconditions
            )
        except Conflict:
            await self._restore(key, f"move to {target} overtaken by a concurrent change")
            raise
        if outcome.plan.assignments.get(key) != target:
            why = outcome.plan.pending.get(key)
            await self._restore(key, f"{target} no longer takes it")
            raise Conflict(
                f"VM {key} not moved to {target}: {why.summary() if why else 'it changed'};"
                f" it starts again on {source}"
            )
        log.info("VM %s moved from %s to %s (cold)", key, source, target)
        await self.clear_repaired()

    async def clear_repaired(self) -> None:
        """VMs that knowingly broke a rule (on_failure=degrade) whose rules all hold now
        lose the mark, whichever member a repair moved."""
        cache = self.cache
        marked = {k: s for k, s in cache.vm_status.records.items() if s.degraded}
        if not marked:
            return
        compliance = rule_compliance(cache.snapshot())
        for key, status in sorted(marked.items()):
            if any(k in compliance and not compliance[k].satisfied for k in status.degraded):
                continue
            skey = keyspace.vm_status(status.scope, status.name)
            rev = await self.store.commit(
                [Compare.unchanged(skey, cache.vm_status.revs.get(key, 0))],
                {skey: codec.dumps(dataclasses.replace(status, degraded=()))},
                fence=self.planner.fence(),
            )
            if rev:
                log.info("VM %s no longer breaks %s", key, ", ".join(status.degraded))
                await cache.wait_for_revision(rev)

    async def _stop_on_source(self, spec: VM, a: Assignment, target: str) -> None:
        """Assign the VM stopped to its host at a new epoch, then wait for the host's
        report at that epoch with the domain off (or its registration gone)."""
        cache = self.cache
        key = spec.key
        status = cache.vm_status.records.get(key)
        epoch = max(a.epoch, status.epoch if status is not None else 0) + 1
        stopped = Assignment(
            vm=dataclasses.replace(spec, power=Power.STOPPED), host=a.host, epoch=epoch
        )
        akey = cache.assignment_key(key)
        assert akey is not None
        skey = keyspace.vm_status(spec.scope, spec.name)
        moving = VMStatus(
            scope=spec.scope,
            name=spec.name,
            phase=Phase.SCHEDULED,
            reason=f"{MOVING}{target}: stopping on {a.host}",
            host=a.host,
            epoch=epoch,
            since=self.wall(),
            start_failures=status.start_failures if status is not None else (),
        )
        rev = await self.store.commit(
            [Compare.unchanged(*akey), Compare.unchanged(skey, cache.vm_status.revs.get(key, 0))],
            {akey[0]: codec.dumps(stopped), skey: codec.dumps(moving)},
            fence=self.planner.fence(),
        )
        if not rev:
            raise Busy(f"VM {key} changed while its move started; retry")
        await cache.wait_for_revision(rev)

        def stopped_there() -> bool:
            if a.host not in cache.hosts.records:
                return True
            d = cache.domains.records.get(key)
            return (
                d is not None and d.host == a.host and d.epoch == epoch and d.state not in _ACTIVE
            )

        changed = asyncio.Event()

        def on_change(change: Change) -> None:
            if change.kind in (kinds.DOMAINS, kinds.HOSTS, kinds.RESYNC):
                changed.set()

        remove = cache.add_listener(on_change)
        try:
            async with asyncio.timeout(self.stop_timeout_s):
                while not stopped_there():
                    await changed.wait()
                    changed.clear()
        except TimeoutError:
            await self._restore(key, f"{a.host} did not stop it within {self.stop_timeout_s:g}s")
            raise Unavailable(
                f"VM {key} not moved: host {a.host} did not report it stopped within"
                f" {self.stop_timeout_s:g}s; it runs on there"
            ) from None
        finally:
            remove()

    async def _restore(self, key: str, why: str) -> None:
        """Give the VM back its own power state where it is (an aborted move)."""
        cache = self.cache
        await cache.fresh()
        spec = cache.vms.records.get(key)
        a = cache.assignments.records.get(key)
        akey = cache.assignment_key(key)
        if spec is None or a is None or akey is None or a.vm.power is spec.power:
            return
        log.warning("move of VM %s aborted (%s); restarting it on %s", key, why, a.host)
        rev = await self.store.commit(
            [Compare.unchanged(*akey)],
            {akey[0]: codec.dumps(dataclasses.replace(a, vm=spec))},
            fence=self.planner.fence(),
        )
        if rev:
            await cache.wait_for_revision(rev)

    async def repair_interrupted(self) -> int:
        """Assignments a cold move left stopped (its coordinator died mid-move) get the
        VM's own power state back: derived from the records, so any leader repairs them."""
        cache = self.cache
        count = 0
        for key, a in list(cache.assignments.records.items()):
            spec = cache.vms.records.get(key)
            status = cache.vm_status.records.get(key)
            if key in self.inflight or spec is None or a.vm.power is spec.power:
                continue
            if status is None or not status.reason.startswith(MOVING):
                continue
            await self._restore(key, "its move was interrupted")
            count += 1
        return count


class LiveMover:
    """The daemon's `Mover`: live migration (coordinator/migration.py), so a rebalance or a
    `--rebalance` moves guests without stopping them. Each VM's `migration` setting
    decides the rest: `restart` moves cold (`cold`), `live_or_restart` moves cold when
    the live migration is refused or fails, and `live` (the default) stays where it was,
    with the reason raised."""

    def __init__(self, migrations: Migrations, cache: Cache, cold: ColdMover) -> None:
        self.migrations = migrations
        self.cache = cache
        self.cold = cold

    async def move(self, vm: str, target: str) -> None:
        spec = self.cache.vms.records.get(vm)
        if spec is None:
            raise NotFound(f"VM {vm} does not exist")
        if spec.migration is MigrationPolicy.RESTART:
            await self.cold.move(vm, target)
            return
        try:
            await self.migrations.migrate_vm(spec.scope, spec.name, target)
        except (Conflict, Unavailable) as e:
            if spec.migration is not MigrationPolicy.LIVE_OR_RESTART:
                raise
            log.info("VM %s: live migration to %s not done (%s); moving it cold", vm, target, e)
            await self.cold.move(vm, target)

    async def repair_interrupted(self) -> int:
        return await self.cold.repair_interrupted()
