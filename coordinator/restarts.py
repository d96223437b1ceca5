"""Failed starts (vSphere's restart count): a VM whose start failed on its host is moved to
another host, excluding those it already failed on; after `max_start_attempts` hosts in a
row it stays `failed` with the reasons until an operator runs `vm start`.

Level-triggered: what to do follows from the records alone (the assignment, the host's
domain report at that epoch, the failures kept in the VM's status record in etcd).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from hvplace.coordinator import cache as kinds
from hvplace.coordinator.cache import Cache, Change
from hvplace.coordinator.phases import failures_text, reports_current
from hvplace.coordinator.placement import Batch, Plan, place
from hvplace.coordinator.planner import Planner
from hvplace.coordinator.snapshot import Snapshot
from hvplace.coordinator.store import Store, Txn
from hvplace.proto import codec, keyspace, records
from hvplace.proto.errors import Busy
from hvplace.proto.records import (
    TOPOLOGY_HOST,
    VM,
    Assignment,
    DomainState,
    DomainStatus,
    Phase,
    StartFailure,
    VMStatus,
)
from hvplace.proto.selectors import LabelExpression, NodeAffinity, NodeSelectorTerm, Op

log = logging.getLogger(__name__)


def excluding(affinity: NodeAffinity, hosts: Iterable[str]) -> NodeAffinity:
    """The node affinity with `host NotIn (hosts)` added to every required term."""
    names = tuple(sorted(set(hosts)))
    if not names:
        return affinity
    expr = LabelExpression(key=TOPOLOGY_HOST, operator=Op.NOT_IN, values=names)
    terms = tuple(
        dataclasses.replace(t, match_expressions=(*t.match_expressions, expr))
        for t in affinity.required
    ) or (NodeSelectorTerm(match_expressions=(expr,)),)
    return dataclasses.replace(affinity, required=terms)


def replace_failed(snapshot: Snapshot, vm: VM, failed_on: Iterable[str]) -> Plan:
    """A plan moving `vm` off its host to one it has not failed on (pure)."""
    moved = dataclasses.replace(vm, node_affinity=excluding(vm.node_affinity, failed_on))
    others = {k: h for k, h in snapshot.placements.items() if k != vm.key}
    snap = dataclasses.replace(snapshot, vms={**snapshot.vms, vm.key: moved}, placements=others)
    return place(snap, Batch((moved,)))


class Restarts:
    """The leader's handling of failed starts; `sync()` is one level-triggered pass."""

    def __init__(
        self,
        store: Store,
        cache: Cache,
        planner: Planner,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache = cache
        self.planner = planner
        self.wall = wall
        self._dirty: set[str] = set()
        self._full = True

    def notice(self, change: Change) -> bool:
        """Whether a change may need a pass: a domain reported failed or running, a status
        carrying failures. Only those keys are looked at (a full pass on resync)."""
        record = change.record
        if change.kind == kinds.DOMAINS and isinstance(record, DomainStatus):
            if record.state in (DomainState.FAILED, DomainState.RUNNING):
                self._dirty.add(change.name)
                return True
        elif change.kind == kinds.VM_STATUS and isinstance(record, VMStatus):
            if record.start_failures:
                self._dirty.add(change.name)
                return True
        elif change.kind == kinds.RESYNC:
            self._full = True
            return True
        return False

    def resync(self) -> None:
        self._full = True

    def _candidates(self) -> list[str]:
        cache = self.cache
        if self._full:
            self._full = False
            self._dirty.clear()
            keys = {k for k, d in cache.domains.records.items() if d.state is DomainState.FAILED}
            keys.update(k for k, s in cache.vm_status.records.items() if s.start_failures)
            return sorted(keys)
        keys, self._dirty = self._dirty, set()
        return sorted(keys)

    async def sync(self) -> None:
        busy: list[str] = []
        for key in self._candidates():
            try:
                await self._sync_vm(key)
            except Busy:
                busy.append(key)
        if busy:
            self._dirty.update(busy)
            raise Busy(f"start failures of {', '.join(busy[:5])} changed concurrently")

    async def _sync_vm(self, key: str) -> None:
        cache = self.cache
        vm = cache.vms.records.get(key)
        a = cache.assignments.records.get(key)
        status = cache.vm_status.records.get(key)
        domain = cache.domains.records.get(key)
        if vm is None or a is None or status is None:
            return
        here = (a.host, a.epoch)
        failed_here = any((f.host, f.epoch) == here for f in status.start_failures)
        if reports_current(domain, a) and not failed_here:
            assert domain is not None
            if domain.state is DomainState.FAILED:
                failure = StartFailure(
                    host=a.host, epoch=a.epoch, reason=domain.last_error, at=self.wall()
                )
                log.warning("VM %s failed to start on %s: %s", key, a.host, domain.last_error)
                recorded = dataclasses.replace(
                    status, start_failures=(*status.start_failures, failure)
                )
                await self._write(key, status, recorded)
                status = recorded
                failed_here = True
            elif domain.state is DomainState.RUNNING and status.start_failures:
                # It runs: the count is of failures in a row, so it starts over.
                await self._write(key, status, dataclasses.replace(status, start_failures=()))
                return
        if failed_here:
            await self._move(vm, status)

    async def _move(self, vm: VM, status: VMStatus) -> None:
        cfg = self.cache.cluster_config()
        limit = cfg.max_start_attempts or records.ClusterConfig().max_start_attempts
        failures = status.start_failures
        text = failures_text(failures)
        if len(failures) >= limit:
            await self._give_up(
                vm,
                status,
                f"failed to start on {len(failures)} host(s) in a row ({text});"
                f" max_start_attempts is {limit}: `hvplace vm start` retries",
            )
            return
        failed_on = {f.host for f in failures}
        preview = replace_failed(self.cache.snapshot(), vm, failed_on)
        if vm.key not in preview.assignments:
            why = preview.pending.get(vm.key)
            await self._give_up(
                vm,
                status,
                f"failed to start on {text}; no other host can take it"
                f" ({why.summary() if why else 'no host'}): `hvplace vm start` retries",
            )
            return

        def compute(snap: Snapshot) -> tuple[Plan, Sequence[VM]]:
            current = snap.vms.get(vm.key)
            if current is None or vm.key not in snap.placements:
                return Plan(revision=snap.revision), []
            return replace_failed(snap, current, failed_on), [current]

        outcome = await self.planner.commit_with(compute, write_specs=False, atomic=False)
        host = outcome.plan.assignments.get(vm.key)
        log.warning(
            "VM %s re-placed on %s after failing to start on %s (attempt %d of %d)",
            vm.key,
            host or "(none)",
            ", ".join(sorted(failed_on)),
            len(failures) + 1,
            limit,
        )

    async def _give_up(self, vm: VM, status: VMStatus, reason: str) -> None:
        """`failed` for good: the assignment is taken back (the agent undefines the
        domain and the VM holds no capacity); the status keeps the epoch and reasons."""
        log.error("VM %s %s", vm.key, reason)
        failed = dataclasses.replace(
            status,
            phase=Phase.FAILED,
            reason=reason,
            host="",
            since=self.wall(),
            explanation=None,
        )
        await self._write(vm.key, status, failed, unassign=True)

    async def _write(
        self, key: str, basis: VMStatus, status: VMStatus, unassign: bool = False
    ) -> None:
        """Write `status` over the VM's status record through the one read-modify-write,
        if the record is still `basis` (what the decision was made from; else Busy, and
        the next pass decides again); with `unassign`, its assignment (as the cache
        holds it) is deleted in the same transaction."""
        cache = self.cache
        skey = keyspace.vm_status(status.scope, status.name)
        assignment = cache.assignments.records.get(key) if unassign else None
        akey = keyspace.assignment(assignment.host, status.scope, status.name) if assignment else ""

        async def change(txn: Txn) -> None:
            raw = await txn.get(skey)
            if raw is None or codec.loads(VMStatus, raw) != basis:
                raise Busy(f"VM {key} changed while its start failure was recorded")
            if assignment is not None:
                held = await txn.get(akey)
                if held is None or codec.loads(Assignment, held) != assignment:
                    raise Busy(f"VM {key} was placed again while it was given up")
                txn.delete(akey)
            txn.put(skey, codec.dumps(status))

        done = await self.store.update(change, fence=self.planner.fence(), subject=f"VM {key}")
        if done.revision:
            await cache.wait_for_revision(done.revision)
