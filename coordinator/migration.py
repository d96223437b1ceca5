"""Live migration, coordinator side: choose a target under every required rule, record the
migration (the target's reservation), and settle it from what the agents report.

`Migrations.migrate_vm(scope, name, to)` is the one entry point (API, drain, rebalancer).
The protocol, in etcd records (keyspace.py):

1. Start: one fenced transaction puts a `Migration` record under the source host and
   under the target, comparing the VM's assignment and the rules it was checked against.
   From then the target's share counts in placement (Snapshot.reservations), so another
   migration or a create that would break a rule with it is refused.
2. The source agent runs libvirt's live migration (peer to peer, its libvirtd to the
   target's); the target agent keeps the incoming domain. The source reports libvirt's
   outcome in its DomainStatus (`migrated_to` or `migration_error`).
3. Settle (level-triggered, by whichever coordinator leads, `settle()`): on completion one
   transaction moves the assignment to the target with a higher epoch and `adopt_epoch`
   (the target re-tags the running domain) and deletes the records; on failure it deletes
   the records and the VM stays, its status saying why.

A VM is never active on two hosts: libvirt runs it on one side at a time; the source
never re-creates a VM whose migration is recorded; the target destroys an incoming domain
once its record is gone without an assignment. A lost source settles by what the target
runs (it fenced before it was declared lost); a lost target aborts (its agent fenced,
destroying the incoming guest). A cold move (`restart`) deletes the source's assignment
with the record and assigns the target once the source reports the guest stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hvplace.coordinator import cache as kinds
from hvplace.coordinator.cache import Cache, Change
from hvplace.coordinator.placement.moves import MoveTarget, choose_target
from hvplace.coordinator.planner import Planner
from hvplace.coordinator.store import Compare, Store
from hvplace.proto import codec, keyspace, records
from hvplace.proto.errors import Busy, Conflict, InvalidInput, NotFound, Unavailable
from hvplace.proto.names import check_name
from hvplace.proto.records import Assignment, DomainState, DomainStatus, Migration, Phase, VMStatus

log = logging.getLogger(__name__)

MIGRATION_TIMEOUT_S = 120.0
"""libvirt aborts a live migration that has not converged by then (the source agent's timer)."""
SETTLE_GRACE_S = 30.0
"""A record still unsettled this long after its timeout is aborted (an agent gone quiet)."""
ATTEMPTS = 5

ACTIVE = frozenset({DomainState.RUNNING, DomainState.PAUSED})


class MigrationFailed(Unavailable):
    """libvirt or the hosts could not move the VM; it stays where it ran, saying why."""


@dataclass(frozen=True, slots=True)
class MigrationResult:
    vm: str
    source: str
    target: str
    seconds: float
    mode: str  # live | restart | none (dry run)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `settle` decides for one record: complete, abort (with why) or wait."""

    action: str  # complete | abort | wait | start (a cold move's second step)
    reason: str = ""


def decide(
    m: Migration,
    *,
    assignment: Assignment | None,
    spec_exists: bool,
    source_alive: bool,
    target_alive: bool,
    source: DomainStatus | None,
    target: DomainStatus | None,
    now: float,
) -> Verdict:
    """Pure: the fate of one migration record from the records as they are now."""
    if not spec_exists:
        return Verdict("abort", "the VM was deleted")
    if m.restart:
        if assignment is not None:
            return Verdict("abort", f"the VM was placed on {assignment.host} meanwhile")
        active = (
            source is not None
            and source.uid == m.uid
            and source.epoch == m.epoch
            and source.state in ACTIVE
        )
        if not target_alive:
            return Verdict("abort", f"target host {m.target} lost; placing the VM anew")
        if active and source_alive:
            return Verdict("wait")
        return Verdict("start")
    if assignment is None or (assignment.host, assignment.vm.uid, assignment.epoch) != (
        m.source,
        m.uid,
        m.epoch,
    ):
        return Verdict("abort", "the VM's assignment changed during the migration")
    ours = source is not None and (source.uid, source.epoch) == (m.uid, m.epoch)
    # A report on an earlier attempt (an error, a completion) says nothing of this one.
    this_job = ours and source is not None and source.migration_started_at == m.started_at
    target_running = (
        target is not None
        and (target.uid, target.epoch) == (m.uid, m.epoch)
        and target.state is DomainState.RUNNING
    )
    source_done = (
        source is None
        or not source_alive
        or (this_job and source.migrated_to == m.target)
        or (ours and source.state not in ACTIVE and not source.migrating_to)
    )
    if target_running and source_done:
        return Verdict("complete")
    if this_job and source is not None and source.migration_error and not source.migrating_to:
        return Verdict("abort", f"live migration to {m.target} failed: {source.migration_error}")
    if not target_alive:
        return Verdict("abort", f"target host {m.target} lost during the migration")
    if not source_alive:
        return Verdict("abort", f"source host {m.source} lost during the migration")
    timeout = m.timeout_s or MIGRATION_TIMEOUT_S
    if now > m.started_at + timeout + SETTLE_GRACE_S:
        return Verdict("abort", f"live migration to {m.target} unsettled after {timeout:g}s")
    return Verdict("wait")


class Migrations:
    """Starts migrations (API, drain, rebalancer) and settles them (the leader's loop).
    Holds no state of its own: every decision is derived from etcd's records."""

    def __init__(
        self,
        store: Store,
        cache: Cache,
        planner: Planner,
        *,
        timeout_s: float = MIGRATION_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache = cache
        self.planner = planner
        self.timeout_s = timeout_s
        self.clock = clock

    # ------------------------------------------------------------------ start

    def _check(self, scope: str, name: str, to: str) -> str:
        check_name(scope, "scope")
        check_name(name, "VM name")
        if to:
            check_name(to, "host name")
        key = records.vm_key(scope, name)
        cache = self.cache
        if key not in cache.vms.records:
            raise NotFound(f"VM {key} does not exist")
        a = cache.assignments.records.get(key)
        if a is None:
            raise Conflict(f"VM {key} is not placed on any host; nothing to migrate")
        m = cache.migrations.records.get(key)
        if m is not None:
            raise Conflict(f"VM {key} is already moving from {m.source} to {m.target}")
        return key

    async def migrate_vm(
        self,
        scope: str,
        name: str,
        to: str = "",
        *,
        restart: bool = False,
        dry_run: bool = False,
        wait: bool = True,
    ) -> MigrationResult:
        """Move a placed VM to `to` (checked under every required rule) or to the engine's
        choice: live (libvirt, the guest keeps running) or, with `restart`, cold (stopped
        here, started there). Returns once the move is settled (`wait`), raising
        MigrationFailed with libvirt's reason when it failed (the VM stays), Conflict when
        `to` would break a rule, Unavailable when no host can take the VM."""
        started = time.perf_counter()
        await self.cache.fresh()
        for _attempt in range(ATTEMPTS):
            async with self.planner.lock:
                key = self._check(scope, name, to)
                snap = self.planner.snapshot()
                choice = choose_target(snap, key, to)
                if choice.host is None:
                    if choice.refusal:
                        raise Conflict(f"cannot move {key} to {choice.refusal}")
                    raise Unavailable(
                        f"no host can take {key} under its rules: {choice.explanation.summary()}"
                    )
                mode = "restart" if restart else "live"
                if dry_run:
                    return MigrationResult(key, choice.source, choice.host, 0.0, "none")
                revision = await self._start(key, choice, restart)
                if not revision:
                    await self.cache.fresh()
                    continue
                await self.cache.wait_for_revision(revision)
            break
        else:
            raise Busy(f"VM {scope}/{name} kept changing while its migration started; retry")
        log.info("%s migration of %s: %s -> %s", mode, key, choice.source, choice.host)
        if not wait:
            return MigrationResult(key, choice.source, choice.host, 0.0, mode)
        await self._wait_settled(key)
        a = self.cache.assignments.records.get(key)
        seconds = time.perf_counter() - started
        if a is not None and a.host == choice.host:
            return MigrationResult(key, choice.source, choice.host, seconds, mode)
        status = self.cache.vm_status.records.get(key)
        why = status.reason if status is not None and status.reason else "aborted"
        raise MigrationFailed(f"{key} stays on {choice.source}: {why}")

    async def _start(self, key: str, choice: MoveTarget, restart: bool) -> int:
        cache = self.cache
        vm = cache.vms.records[key]
        a = cache.assignments.records[key]
        info = cache.hosts.records.get(choice.host or "")
        if info is None:
            raise Unavailable(f"host {choice.host} is not registered")
        if not restart and not info.migration_uri:
            raise Conflict(
                f"host {info.name} takes no live migrations (its agent has no migration_uri)"
            )
        assert choice.host is not None
        record = Migration(
            scope=vm.scope,
            name=vm.name,
            uid=vm.uid,
            source=a.host,
            target=choice.host,
            epoch=a.epoch,
            target_uri=info.migration_uri,
            target_address=info.address,
            target_console_dir=info.console_dir,
            started_at=self.clock(),
            timeout_s=self.timeout_s,
            restart=restart,
        )
        raw = codec.dumps(record)
        assignment_key = cache.assignment_key(key)
        assert assignment_key is not None
        snap_rev = cache.revision
        compares = [
            Compare.unchanged(*assignment_key),
            Compare.unchanged(keyspace.vm(vm.scope, vm.name), cache.vms.revs[key]),
            Compare.absent(keyspace.migration(a.host, vm.scope, vm.name)),
            Compare.absent(keyspace.migration(choice.host, vm.scope, vm.name)),
            Compare.prefix_unchanged_since(keyspace.RULES, snap_rev),
            Compare.prefix_unchanged_since(keyspace.POLICIES, snap_rev),
            Compare.unchanged(
                keyspace.host_status(choice.host), cache.host_status.revs.get(choice.host, 0)
            ),
        ]
        puts = {
            keyspace.migration(a.host, vm.scope, vm.name): raw,
            keyspace.migration(choice.host, vm.scope, vm.name): raw,
        }
        deletes: list[str] = []
        if restart:
            # Cold: the source stops the guest as its assignment goes; the target's is
            # written once the source reports it stopped (settle: "start").
            deletes.append(assignment_key[0])
            puts[keyspace.vm_status(vm.scope, vm.name)] = codec.dumps(
                self._status(key, Phase.SCHEDULED, f"restarting on {choice.host}", a.epoch, "")
            )
        return await self.store.commit(compares, puts, deletes, fence=self.planner.fence())

    async def _wait_settled(self, key: str) -> None:
        """Until the VM's migration record is gone (settled by whichever leader)."""
        gone = asyncio.Event()

        def on_change(change: Change) -> None:
            if change.kind in (kinds.MIGRATIONS, kinds.RESYNC) and (
                key not in self.cache.migrations.records
            ):
                gone.set()

        remove = self.cache.add_listener(on_change)
        try:
            if key in self.cache.migrations.records:
                await gone.wait()
        finally:
            remove()

    # ------------------------------------------------------------------ settle

    def _status(self, key: str, phase: Phase, reason: str, epoch: int, host: str) -> VMStatus:
        scope, name = key.split("/", 1)
        prev = self.cache.vm_status.records.get(key)
        return VMStatus(
            scope=scope,
            name=name,
            phase=phase,
            reason=reason,
            host=host,
            epoch=epoch,
            since=self.clock(),
            degraded=prev.degraded if prev is not None else (),
            start_failures=prev.start_failures if prev is not None else (),
        )

    async def _domain(self, host: str, scope: str, name: str) -> DomainStatus | None:
        kv = await self.store.get(keyspace.domain(host, scope, name))
        if kv is None:
            return None
        try:
            return codec.loads(DomainStatus, kv.value)
        except InvalidInput:
            return None

    async def settle(self) -> float | None:
        """Settle every recorded migration that can be; returns the seconds until the
        earliest timeout of those still waiting (None: nothing waits)."""
        cache = self.cache
        wake: float | None = None
        for key, m in sorted(cache.migrations.records.items()):
            verdict = decide(
                m,
                assignment=cache.assignments.records.get(key),
                spec_exists=key in cache.vms.records,
                source_alive=m.source in cache.hosts.records,
                target_alive=m.target in cache.hosts.records,
                source=await self._domain(m.source, m.scope, m.name),
                target=await self._domain(m.target, m.scope, m.name),
                now=self.clock(),
            )
            if verdict.action == "wait":
                due = m.started_at + (m.timeout_s or MIGRATION_TIMEOUT_S) + SETTLE_GRACE_S
                left = max(0.5, due - self.clock())
                wake = left if wake is None else min(wake, left)
                continue
            async with self.planner.lock:
                revision = await self._settle_one(key, m, verdict)
            if revision:
                await cache.wait_for_revision(revision)
        return wake

    async def _settle_one(self, key: str, m: Migration, verdict: Verdict) -> int:
        cache = self.cache
        rev = cache.migrations.revs.get(key)
        if rev is None or cache.migrations.records.get(key) != m:
            return 0
        record_keys = [
            keyspace.migration(m.source, m.scope, m.name),
            keyspace.migration(m.target, m.scope, m.name),
        ]
        compares = [Compare.unchanged(k, rev) for k in record_keys]
        puts: dict[str, bytes] = {}
        deletes: list[str] = list(record_keys)
        status_key = keyspace.vm_status(m.scope, m.name)
        a = cache.assignments.records.get(key)
        vm = cache.vms.records.get(key)
        if verdict.action in ("complete", "start") and vm is not None:
            prev = cache.vm_status.records.get(key)
            floor = prev.epoch if prev is not None else 0
            epoch = max(m.epoch, a.epoch if a is not None else 0, floor) + 1
            live = verdict.action == "complete"
            new = Assignment(vm=vm, host=m.target, epoch=epoch, adopt_epoch=m.epoch if live else 0)
            if a is not None:
                old_key = cache.assignment_key(key)
                assert old_key is not None
                compares.append(Compare.unchanged(*old_key))
                deletes.append(old_key[0])
            else:
                compares.append(Compare.absent(keyspace.assignment(m.target, m.scope, m.name)))
            compares.append(Compare.unchanged(keyspace.vm(m.scope, m.name), cache.vms.revs[key]))
            puts[keyspace.assignment(m.target, m.scope, m.name)] = codec.dumps(new)
            how = "live-migrated" if live else "restarted"
            puts[status_key] = codec.dumps(
                self._status(key, Phase.SCHEDULED, f"{how} from {m.source}", epoch, m.target)
            )
            log.info("%s %s: %s -> %s (epoch %d)", how, key, m.source, m.target, epoch)
        elif vm is not None:
            prev = cache.vm_status.records.get(key)
            phase = prev.phase if prev is not None else Phase.SCHEDULED
            if m.restart:
                phase = Phase.PENDING  # its assignment is gone: the controller places it
            reason = verdict.reason
            host = a.host if a is not None else ""
            epoch = a.epoch if a is not None else m.epoch
            puts[status_key] = codec.dumps(self._status(key, phase, reason, epoch, host))
            log.warning("migration of %s to %s aborted: %s", key, m.target, reason)
        return await self.store.commit(compares, puts, deletes, fence=self.planner.fence())


def interesting(change: Change, migrating: Sequence[str] | None = None) -> bool:
    """Whether a cache change may settle a migration: its record, a domain report of a
    migrating VM, a host coming or going, an assignment or a spec of a migrating VM."""
    if change.kind == kinds.MIGRATIONS or change.kind == kinds.RESYNC:
        return True
    if change.kind in (kinds.DOMAINS, kinds.ASSIGNMENTS, kinds.VMS):
        return migrating is None or change.name in migrating
    return change.kind == kinds.HOSTS
