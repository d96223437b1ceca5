"""Commit a placement plan in one fenced, optimistic etcd transaction (Nomad plan_apply, k8s
GuaranteedUpdate): compare what the plan read, and on conflict refresh, re-plan, retry."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from hvplace.coordinator.cache import Cache
from hvplace.coordinator.failure import replace_lost
from hvplace.coordinator.placement import Batch, Plan, place
from hvplace.coordinator.snapshot import Snapshot
from hvplace.coordinator.store import Compare, Fence, Store
from hvplace.proto import keyspace, models
from hvplace.proto.errors import Busy, Conflict
from hvplace.proto.models import VM, Assignment, HAPriority, Phase, VMStatus

log = logging.getLogger(__name__)

ATTEMPTS = 10
"""Optimistic attempts before `Busy` (Nomad's plan applier retries likewise, bounded)."""
MAX_TXN_VMS = 500
"""VMs per transaction: up to 3 operations and 3 compares each within etcd's
--max-txn-ops 4096 (README); a larger non-atomic batch is committed in chunks."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """A committed plan and the revision it was committed at (0: nothing to write)."""

    plan: Plan
    revision: int
    statuses: Mapping[str, VMStatus] = field(default_factory=dict)


PlanFn = Callable[[Snapshot], tuple[Plan, Sequence[VM]]]
"""Computes a plan from a snapshot and names the VMs whose status it decides."""


class Planner:
    """Single writer of placements inside one coordinator (`lock`), optimistic against
    every other writer (revisions compared), fenced against a deposed leader."""

    def __init__(
        self,
        store: Store,
        cache: Cache,
        fence: Callable[[], Fence | None] = lambda: None,
        *,
        attempts: int = ATTEMPTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache = cache
        self.fence = fence
        self.attempts = attempts
        self.clock = clock
        self.lock = asyncio.Lock()
        self.conflicts = 0
        self.on_committed: Callable[[Outcome, float], None] | None = None
        # Plans sent and not yet in the cache: ticket -> (their VM specs, placements).
        self._inflight: dict[int, tuple[dict[str, VM], dict[str, str]]] = {}
        self._ticket = 0

    async def place_and_commit(
        self,
        vms: Sequence[VM],
        *,
        atomic: bool,
        extra_puts: Mapping[str, bytes] | None = None,
        extra_compares: Sequence[Compare] = (),
        check: Callable[[Snapshot, Plan], None] | None = None,
    ) -> Plan:
        """Place `vms` and commit, with `extra_puts` and `extra_compares`, their specs (when
        new or changed), assignments and statuses. A VM already placed is moved only if
        the engine places it elsewhere. With `atomic`, nothing is written unless every
        VM is placed. Raises Conflict when an extra compare fails (caller's
        precondition), Busy after repeated conflicts, FenceLost when deposed."""
        if not atomic and len(vms) > MAX_TXN_VMS:
            if extra_puts or extra_compares:
                raise ValueError("extra puts/compares need one transaction (atomic or small)")
            plans = [
                await self.place_and_commit(vms[i : i + MAX_TXN_VMS], atomic=False)
                for i in range(0, len(vms), MAX_TXN_VMS)
            ]
            return _merge(plans)

        def compute(snap: Snapshot) -> tuple[Plan, Sequence[VM]]:
            plan = place(snap, Batch(tuple(vms), atomic=atomic))
            if check is not None:
                check(snap, plan)  # e.g. failover admission; raising aborts the commit
            return plan, vms

        outcome = await self.commit_with(
            compute,
            write_specs=True,
            atomic=atomic,
            extra_puts=extra_puts or {},
            extra_compares=extra_compares,
        )
        return outcome.plan

    async def replace_lost(self, lost_hosts: Collection[str]) -> Outcome:
        """Re-place the VMs of `lost_hosts` by HA priority. One that cannot be placed goes
        pending with the reason AND loses its assignment in the same transaction, so a
        returning host finds nothing to start; it is placed anew (a newer epoch) when
        capacity returns. HA `off` VMs keep theirs: they come back with their host.
        The transaction also requires every lost host to be still unregistered: one that
        registered again may already have read its assignments and started them.
        Raises Conflict when one did."""
        lost = set(lost_hosts)

        def compute(snap: Snapshot) -> tuple[Plan, Sequence[VM]]:
            plan = replace_lost(snap, lost)
            keys = [*plan.assignments, *plan.pending]
            return plan, [snap.vms[k] for k in keys if k in snap.vms]

        return await self.commit_with(
            compute,
            write_specs=False,
            atomic=False,
            extra_compares=[Compare.absent(keyspace.host(h)) for h in sorted(lost)],
            unassign_from=lost,
        )

    def snapshot(self) -> Snapshot:
        """What the next plan is computed against (the cache with plans in flight)."""
        return self._snapshot()

    def _snapshot(self) -> Snapshot:
        """The cache's snapshot with the placements of plans still in flight laid over
        it, so a plan computed while another commits counts that one's VMs."""
        snap = self.cache.snapshot()
        if not self._inflight:
            return snap
        vms = dict(snap.vms)
        placements = dict(snap.placements)
        for specs, assigned in self._inflight.values():
            vms.update(specs)
            placements.update(assigned)
        return dataclasses.replace(snap, vms=vms, placements=placements)

    async def commit_with(
        self,
        compute: PlanFn,
        *,
        write_specs: bool,
        atomic: bool,
        extra_puts: Mapping[str, bytes] | None = None,
        extra_compares: Sequence[Compare] = (),
        unassign_from: Collection[str] = (),
    ) -> Outcome:
        """Compute and commit one plan, retrying conflicts against fresh state.

        Under a fence, plans are pipelined: the lock covers computing a plan and sending
        its transaction; the next plan is computed while this one commits, with this
        one's placements laid over the snapshot until the cache shows them. Without a
        fence the lock covers the whole commit (every assignment is compared then)."""
        for attempt in range(self.attempts):
            async with self.lock:
                started = time.perf_counter()
                snap = self._snapshot()
                plan, vms = compute(snap)
                if atomic and plan.pending:
                    return Outcome(plan, 0)
                compares, puts, deletes, statuses, records = self._writes(
                    snap, plan, vms, write_specs, unassign_from
                )
                puts.update(extra_puts or {})
                compares.extend(extra_compares)
                fence = self.fence()
                if fence is None:
                    # Without a fence nothing serializes writers: compare every assignment.
                    compares.append(
                        Compare.prefix_unchanged_since(keyspace.ASSIGNMENTS, snap.revision)
                    )
                if not puts and not deletes and not extra_compares:
                    return Outcome(plan, 0, statuses)
                self.cache.expect({k: (puts[k], r) for k, r in records.items()})
                self._ticket += 1
                ticket = self._ticket
                self._inflight[ticket] = (
                    {vm.key: vm for vm in vms if vm.key in plan.assignments},
                    dict(plan.assignments),
                )
                sending = asyncio.ensure_future(
                    self.store.commit(compares, puts, deletes, fence=fence)
                )
                if fence is None:
                    revision = await self._settle(sending, ticket, records)
            if fence is not None:
                revision = await self._settle(sending, ticket, records)
            if revision:
                outcome = Outcome(plan, revision, statuses)
                if self.on_committed is not None:
                    self.on_committed(outcome, time.perf_counter() - started)
                return outcome
            self.conflicts += 1
            await self._check_preconditions(extra_compares)
            # Someone wrote between our read and our commit: back off with jitter so
            # two writers do not collide again in lockstep, catch up, re-plan.
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
            await self.cache.fresh()
        raise Busy(f"placement kept conflicting after {self.attempts} attempts; retry")

    async def _settle(
        self, sending: asyncio.Future[int], ticket: int, records: Mapping[str, object]
    ) -> int:
        """The commit's revision (0: a compare failed) once the cache shows it; the plan
        stays laid over the snapshot until then."""
        try:
            revision = await sending
            if revision:
                await self.cache.wait_for_revision(revision)
            else:
                self.cache.forget(records)
            return revision
        finally:
            self._inflight.pop(ticket, None)

    async def _check_preconditions(self, compares: Sequence[Compare]) -> None:
        for c in compares:
            if c.prefix:
                continue
            kv = await self.store.get(c.key)
            now = kv.mod_revision if kv is not None else 0
            if now != c.mod_revision:
                raise Conflict(f"{c.key} was changed by a concurrent request")

    def _writes(
        self,
        snap: Snapshot,
        plan: Plan,
        vms: Sequence[VM],
        write_specs: bool,
        unassign_from: Collection[str] = (),
    ) -> tuple[list[Compare], dict[str, bytes], list[str], dict[str, VMStatus], dict[str, object]]:
        cache = self.cache
        now = self.clock()
        compares: list[Compare] = [
            # Rules and policies are few; any change to them invalidates the plan.
            Compare.prefix_unchanged_since(keyspace.RULES, snap.revision),
            Compare.prefix_unchanged_since(keyspace.POLICIES, snap.revision),
        ]
        puts: dict[str, bytes] = {}
        deletes: list[str] = []
        statuses: dict[str, VMStatus] = {}
        records: dict[str, object] = {}  # what each put encodes (see Cache.expect)
        targets: set[str] = set()
        for vm in vms:
            key = vm.key
            spec_key = keyspace.vm(vm.scope, vm.name)
            stored = cache.vms.records.get(key)
            spec_json = b""
            if stored is not None and stored == vm:
                compares.append(Compare.unchanged(spec_key, cache.vms.revs[key]))
            elif write_specs:
                spec_json = puts[spec_key] = models.dumps(vm)
                records[spec_key] = vm
            else:
                continue  # the spec vanished or changed under us: the next pass sees it
            old = cache.assignments.records.get(key)
            old_key = cache.assignment_key(key)
            if old_key is not None:
                compares.append(Compare.unchanged(*old_key))
            host = plan.assignments.get(key)
            previous = cache.vm_status.records.get(key)
            # Start failures stay with the VM until it runs (coordinator/restarts.py).
            failures = previous.start_failures if previous is not None else ()
            if host is not None:
                # Epochs only grow, also past an assignment that was taken back (a VM
                # that failed everywhere keeps its last epoch in its status).
                floor = previous.epoch if previous is not None else 0
                epoch = max(old.epoch if old is not None else 0, floor) + 1
                if old is not None and old.host == host:
                    epoch = old.epoch
                new_key = keyspace.assignment(host, vm.scope, vm.name)
                assignment = Assignment(vm=vm, host=host, epoch=epoch)
                puts[new_key] = (
                    models.dumps_assignment(assignment, spec_json)
                    if spec_json
                    else models.dumps(assignment)
                )
                records[new_key] = assignment
                if old_key is not None and old_key[0] != new_key:
                    deletes.append(old_key[0])
                targets.add(host)
                status = VMStatus(
                    scope=vm.scope,
                    name=vm.name,
                    phase=Phase.SCHEDULED,
                    host=host,
                    epoch=epoch,
                    since=now,
                    degraded=tuple(plan.degraded.get(key, ())),
                    start_failures=failures,
                )
            elif key not in plan.pending:
                continue  # placed already and left where it is: nothing to write
            else:
                why = plan.pending[key]
                host_kept = old.host if old is not None else ""
                if (
                    old is not None
                    and old_key is not None
                    and old.host in unassign_from
                    and vm.ha_priority is not HAPriority.OFF
                ):
                    deletes.append(old_key[0])
                    host_kept = ""
                status = VMStatus(
                    scope=vm.scope,
                    name=vm.name,
                    phase=Phase.PENDING,
                    reason=why.summary(),
                    host=host_kept,
                    epoch=old.epoch if old is not None else (previous.epoch if previous else 0),
                    since=now,
                    explanation=why,
                    start_failures=failures,
                )
                if (
                    previous is not None
                    and previous.phase is Phase.PENDING
                    and previous.reason == status.reason
                    and previous.explanation == status.explanation
                    and previous.host == status.host
                ):
                    continue  # unchanged: no write, no watch event, no busy loop
            statuses[key] = status
            status_key = keyspace.vm_status(vm.scope, vm.name)
            puts[status_key] = models.dumps(status)
            records[status_key] = status
        for host in sorted(targets):
            compares.append(
                Compare.unchanged(keyspace.host_status(host), cache.host_status.revs.get(host, 0))
            )
        return compares, puts, deletes, statuses, records


def _merge(plans: Sequence[Plan]) -> Plan:
    assignments: dict[str, str] = {}
    pending: dict[str, models.Explanation] = {}
    degraded: dict[str, tuple[str, ...]] = {}
    for p in plans:
        assignments.update(p.assignments)
        pending.update(p.pending)
        degraded.update(p.degraded)
    return Plan(
        revision=plans[-1].revision if plans else 0,
        assignments=assignments,
        pending=pending,
        degraded=degraded,
    )
