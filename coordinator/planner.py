"""Commit a placement plan in one fenced, optimistic etcd transaction (Nomad plan_apply, k8s
GuaranteedUpdate): compare what the plan read, and on conflict refresh, re-plan, retry
(the one retry policy, store.CONFLICT_RETRY). Returns the whole outcome: the plan, the
statuses it wrote and the failover admission report it was checked against."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from hvplace.coordinator.admission import AdmissionCheck, AdmissionReport, combined
from hvplace.coordinator.cache import Cache
from hvplace.coordinator.failure import replace_lost
from hvplace.coordinator.placement import Batch, Plan, place
from hvplace.coordinator.snapshot import Snapshot
from hvplace.coordinator.store import CONFLICT_RETRY, Compare, Fence, Retry, Store, Txn
from hvplace.proto import codec, keyspace, records
from hvplace.proto.errors import Busy, Conflict
from hvplace.proto.records import VM, Assignment, HAPriority, Phase, VMStatus

log = logging.getLogger(__name__)

MAX_TXN_VMS = 500
"""VMs per transaction: up to 3 operations and 3 compares each within etcd's
--max-txn-ops 4096 (README); a larger non-atomic batch is committed in chunks."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """A committed plan, the revision it was committed at (0: nothing written), the status
    records it wrote (by VM key, as stored) and, when asked for, the failover admission
    report of the plan committed."""

    plan: Plan
    revision: int
    statuses: Mapping[str, VMStatus] = field(default_factory=dict)
    admission: AdmissionReport | None = None


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
        retry: Retry = CONFLICT_RETRY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache = cache
        self.fence = fence
        self.retry = retry
        self.clock = clock
        self.lock = asyncio.Lock()
        self.conflicts = 0
        self.on_committed: Callable[[Outcome, float], None] | None = None
        # Plans sent and not yet in the cache: ticket -> (their VM specs, placements).
        self._inflight: dict[int, tuple[dict[str, VM], dict[str, str]]] = {}
        self._ticket = 0
        self._settled = asyncio.Event()  # set while no plan is in flight
        self._settled.set()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Placement held still: no plan in flight and none computed until the block
        ends. A change to what plans read that they do not compare at commit (a host's
        or a VM's labels) is decided and written inside, so no plan computed under the
        old records lands beside it; the block must wait for its write to show in the
        cache before it ends."""
        async with self.lock:
            await self._settled.wait()
            yield

    async def place_and_commit(
        self,
        vms: Sequence[VM],
        *,
        atomic: bool,
        admission: AdmissionCheck | None = None,
        txn: Txn | None = None,
    ) -> Outcome:
        """Place `vms` and commit their specs (when new or changed), assignments and
        statuses, with the caller's `txn`: its reads are compared (one that changed is a
        Conflict, the caller's precondition) and its writes committed in the same
        transaction. A VM already placed is moved only if the engine places it
        elsewhere. With `admission`, each attempt's plan is checked before anything is
        written (a refusal raises). With `atomic`, nothing is written unless every VM is
        placed. Busy after repeated conflicts, FenceLost when deposed."""
        if not atomic and len(vms) > MAX_TXN_VMS:
            if txn is not None or admission is not None:
                raise ValueError("a caller's txn or admission needs one transaction")
            outcomes = [
                await self.place_and_commit(vms[i : i + MAX_TXN_VMS], atomic=False)
                for i in range(0, len(vms), MAX_TXN_VMS)
            ]
            return merge(outcomes)

        def compute(snap: Snapshot) -> tuple[Plan, Sequence[VM]]:
            return place(snap, Batch(tuple(vms), atomic=atomic)), vms

        return await self.commit_with(
            compute, write_specs=True, atomic=atomic, admission=admission, txn=txn
        )

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

        unregistered = Txn(self.store)
        for h in sorted(lost):
            unregistered.require_absent(keyspace.host(h))
        return await self.commit_with(
            compute, write_specs=False, atomic=False, txn=unregistered, unassign_from=lost
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
        vms: dict[str, VM] = {}
        placements: dict[str, str] = {}
        for specs, assigned in self._inflight.values():
            vms.update(specs)
            placements.update(assigned)
        return snap.overlaid(vms, placements)

    async def commit_with(
        self,
        compute: PlanFn,
        *,
        write_specs: bool,
        atomic: bool,
        admission: AdmissionCheck | None = None,
        txn: Txn | None = None,
        unassign_from: Collection[str] = (),
    ) -> Outcome:
        """Compute and commit one plan, retrying conflicts against fresh state; `txn` and
        `admission` as in `place_and_commit` (admission takes the plan's VMs as the change).

        Under a fence, plans are pipelined: the lock covers computing a plan and sending
        its transaction; the next plan is computed while this one commits, with this
        one's placements laid over the snapshot until the cache shows them. Without a
        fence the lock covers the whole commit (every assignment is compared then)."""
        preconditions = txn.compares if txn is not None else []
        for attempt in range(self.retry.attempts):
            async with self.lock:
                started = time.perf_counter()
                snap = self._snapshot()
                plan, vms = compute(snap)
                report = None
                if admission is not None:
                    # On this attempt's own plan: the report matches what is committed.
                    placed = None if plan.pending else plan
                    report = admission.run(snap, extra_vms=vms, extra_plan=placed)
                if atomic and plan.pending:
                    return Outcome(plan, 0, admission=report)
                compares, puts, deletes, statuses, records = self._writes(
                    snap, plan, vms, write_specs, unassign_from
                )
                if txn is not None:
                    puts.update(txn.puts)
                    deletes.extend(k for k in txn.deletes if k not in deletes)
                compares.extend(preconditions)
                fence = self.fence()
                if fence is None:
                    # Without a fence nothing serializes writers: compare every assignment.
                    compares.append(
                        Compare.prefix_unchanged_since(keyspace.ASSIGNMENTS, snap.revision)
                    )
                if not puts and not deletes and not preconditions:
                    return Outcome(plan, 0, statuses, report)
                self.cache.expect({k: (puts[k], r) for k, r in records.items()})
                self._ticket += 1
                ticket = self._ticket
                self._settled.clear()
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
                outcome = Outcome(plan, revision, statuses, report)
                if self.on_committed is not None:
                    self.on_committed(outcome, time.perf_counter() - started)
                return outcome
            self.conflicts += 1
            await self._check_preconditions(preconditions)
            # Someone wrote between our read and our commit: back off, catch up, re-plan.
            await self.retry.pause(attempt)
            await self.cache.fresh()
        raise Busy(f"placement kept conflicting after {self.retry.attempts} attempts; retry")

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
            if not self._inflight:
                self._settled.set()

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
                spec_json = puts[spec_key] = codec.dumps(vm)
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
                    codec.dumps_assignment(assignment, spec_json)
                    if spec_json
                    else codec.dumps(assignment)
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
            puts[status_key] = codec.dumps(status)
            records[status_key] = status
        for host in sorted(targets):
            compares.append(
                Compare.unchanged(keyspace.host_status(host), cache.host_status.revs.get(host, 0))
            )
        return compares, puts, deletes, statuses, records


def merge(outcomes: Sequence[Outcome]) -> Outcome:
    """The outcome of a batch committed in chunks, as one."""
    assignments: dict[str, str] = {}
    pending: dict[str, records.Explanation] = {}
    degraded: dict[str, tuple[str, ...]] = {}
    statuses: dict[str, VMStatus] = {}
    for o in outcomes:
        assignments.update(o.plan.assignments)
        pending.update(o.plan.pending)
        degraded.update(o.plan.degraded)
        statuses.update(o.statuses)
    plan = Plan(
        revision=outcomes[-1].plan.revision if outcomes else 0,
        assignments=assignments,
        pending=pending,
        degraded=degraded,
    )
    reports = [o.admission for o in outcomes if o.admission is not None]
    return Outcome(
        plan,
        max((o.revision for o in outcomes), default=0),
        statuses,
        combined(reports) if reports else None,
    )
