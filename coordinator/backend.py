"""The API's Backend over etcd: a list+watch cache of /hvplace/v1/, fenced transactions and a
serialized, optimistic placement commit. Stands in until store/cache/planner land."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aetcd
from hvplace.coordinator.operations import Change, ClusterView, Leadership
from hvplace.coordinator.placement import Batch, Plan, place
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto import keyspace, models
from hvplace.proto.errors import Busy, Conflict, HvplaceError, Interrupted, Unavailable
from hvplace.proto.models import (
    VM,
    Assignment,
    ClusterConfig,
    DomainStatus,
    HostInfo,
    HostStatus,
    Phase,
    Rule,
    ScopePolicy,
    VMStatus,
)

WAIT_S = 10.0
"""How long a write waits for the cache to show it before answering."""
PLACE_ATTEMPTS = 10
"""Optimistic placement retries before answering `busy` (Nomad's plan_apply retries)."""

# Changes under these prefixes can invalidate a placement computed before them.
_PLACEMENT_INPUTS = (
    keyspace.ASSIGNMENTS,
    keyspace.HOST_STATUS,
    keyspace.RULES,
    keyspace.POLICIES,
)


def _b(key: str) -> bytes:
    return key.encode()


class EtcdBackend:
    """Implements operations.Backend; `leadership` and `fence` come from the election
    (fence = the leader key and its create revision, compared in every write)."""

    def __init__(
        self,
        client: aetcd.Client,
        leadership: Callable[[], Leadership] | None = None,
        fence: Callable[[], tuple[str, int] | None] | None = None,
    ) -> None:
        self.client = client
        self._leadership = leadership or (lambda: Leadership(is_leader=True, leader="standalone"))
        self._fence = fence or (lambda: None)
        self.revision = 0
        self.hosts: dict[str, HostInfo] = {}
        self.host_status: dict[str, HostStatus] = {}
        self.vms: dict[str, VM] = {}
        self.vm_status: dict[str, VMStatus] = {}
        self.assignments: dict[str, Assignment] = {}
        self.domains: dict[str, DomainStatus] = {}
        self.rules: dict[str, Rule] = {}
        self.policies: dict[str, ScopePolicy] = {}
        self.config = ClusterConfig()
        self._view: ClusterView | None = None
        self._advanced = asyncio.Condition()
        self._subscribers: set[asyncio.Queue[Change]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._watch: Any = None
        self._place_lock = asyncio.Lock()

    # ------------------------------------------------------------------ cache

    async def start(self) -> None:
        listing = await self.client.get_prefix(_b(keyspace.ROOT))
        for kv in listing.kvs:
            self._apply("put", kv.key.decode(), kv.value)
        self.revision = listing.header.revision
        self._watch = await self.client.watch(
            _b(keyspace.ROOT),
            range_end=_b(keyspace.prefix_end(keyspace.ROOT)),
            start_revision=self.revision + 1,
        )
        self._watch_task = asyncio.create_task(self._run_watch(), name="hvplace-api-watch")

    async def close(self) -> None:
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await self._watch.cancel()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task

    async def _run_watch(self) -> None:
        async for event in self._watch:
            kind = "put" if event.kind == aetcd.EventKind.PUT else "delete"
            key = event.kv.key.decode()
            rev = event.kv.mod_revision
            self._apply(kind, key, event.kv.value)
            change = Change(revision=rev, type=kind, key=key, value=event.kv.value)
            for q in list(self._subscribers):
                q.put_nowait(change)
            if rev > self.revision:
                self.revision = rev
                async with self._advanced:
                    self._advanced.notify_all()

    def _apply(self, kind: str, key: str, value: bytes) -> None:
        self._view = None
        put = kind == "put"
        # A malformed record is skipped here; its writer is at fault and the API must go on.
        with contextlib.suppress(HvplaceError):
            self._apply_record(put, key, value)

    def _apply_record(self, put: bool, key: str, value: bytes) -> None:
        if key == keyspace.CONFIG:
            self.config = models.loads(ClusterConfig, value) if put else ClusterConfig()
            return
        if key.startswith(keyspace.ASSIGNMENTS) or key.startswith(keyspace.DOMAINS):
            prefix = (
                keyspace.ASSIGNMENTS if key.startswith(keyspace.ASSIGNMENTS) else keyspace.DOMAINS
            )
            host, scope, vm = keyspace.split(key, prefix)
            name = models.vm_key(scope, vm)
            placed: dict[str, Any] = (
                self.assignments if prefix == keyspace.ASSIGNMENTS else self.domains
            )
            record_cls: type[Any] = Assignment if prefix == keyspace.ASSIGNMENTS else DomainStatus
            if put:
                placed[name] = models.loads(record_cls, value)
            elif name in placed and placed[name].host == host:
                # A delete of the old host's key after a move must not drop the new one.
                del placed[name]
            return
        routes: tuple[tuple[str, dict[str, Any], type[Any]], ...] = (
            (keyspace.HOSTS, self.hosts, HostInfo),
            (keyspace.HOST_STATUS, self.host_status, HostStatus),
            (keyspace.VMS, self.vms, VM),
            (keyspace.VM_STATUS, self.vm_status, VMStatus),
            (keyspace.RULES, self.rules, Rule),
            (keyspace.POLICIES, self.policies, ScopePolicy),
        )
        for prefix, table, cls in routes:
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if put:
                    table[name] = models.loads(cls, value)
                else:
                    table.pop(name, None)
                return

    def view(self) -> ClusterView:
        if self._view is None:
            snapshot = Snapshot.from_records(
                revision=self.revision,
                infos=self.hosts.values(),
                statuses=self.host_status,
                vms=self.vms.values(),
                assignments=self.assignments.values(),
                rules=self.rules.values(),
                policies=self.policies.values(),
            )
            self._view = ClusterView(
                revision=self.revision,
                snapshot=snapshot,
                hosts=dict(self.hosts),
                host_status=dict(self.host_status),
                vms=dict(self.vms),
                vm_status=dict(self.vm_status),
                assignments=dict(self.assignments),
                domains=dict(self.domains),
                rules=dict(self.rules),
                policies=dict(self.policies),
                config=self.config,
            )
        return self._view

    async def wait_for_revision(self, revision: int) -> None:
        async with asyncio.timeout(WAIT_S), self._advanced:
            await self._advanced.wait_for(lambda: self.revision >= revision)

    async def fresh_view(self) -> ClusterView:
        now = await self.client.get_prefix(_b(keyspace.CONFIG), keys_only=True)
        await self.wait_for_revision(now.header.revision)
        return self.view()

    def leadership(self) -> Leadership:
        return self._leadership()

    async def changes(self) -> AsyncIterator[Change]:
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    # ------------------------------------------------------------------ writes

    async def get(self, key: str) -> tuple[bytes, int] | None:
        found = await self.client.get(_b(key))
        if found is None:
            return None
        return bytes(found.value), int(found.mod_revision)

    async def _txn(
        self, compares: list[Any], puts: Sequence[tuple[str, bytes]], deletes: Sequence[str]
    ) -> tuple[bool, int]:
        t = self.client.transactions
        fence = self._fence()
        failure = []
        if fence is not None:
            compares = [*compares, t.create(_b(fence[0])) == fence[1]]
            failure = [t.get(_b(fence[0]))]
        ops = [t.put(_b(k), v) for k, v in puts] + [t.delete(_b(k)) for k in deletes]
        try:
            ok, responses = await self.client.transaction(
                compare=compares, success=ops, failure=failure
            )
        except aetcd.exceptions.ConnectionFailedError as e:
            raise Unavailable(f"etcd cannot be reached: {e}") from None
        if not ok and fence is not None:
            held = responses[0] if responses else []
            if not held or held[0][1].create_revision != fence[1]:
                raise Interrupted("leadership was lost; nothing was written, retry")
        revision = 0
        if ok and responses:
            first = responses[0]
            header = getattr(first, "response_put", None) or getattr(
                first, "response_delete_range", None
            )
            if header is not None:
                revision = header.header.revision
        return ok, revision

    async def commit(
        self,
        compares: Sequence[tuple[str, int]],
        puts: Sequence[tuple[str, bytes]],
        deletes: Sequence[str] = (),
    ) -> bool:
        t = self.client.transactions
        ok, revision = await self._txn([t.mod(_b(k)) == rev for k, rev in compares], puts, deletes)
        if ok and revision:
            await self.wait_for_revision(revision)
        return ok

    async def place_and_commit(
        self,
        vms: Sequence[VM],
        atomic: bool,
        extra_puts: Sequence[tuple[str, bytes]],
        extra_absent: Sequence[str],
    ) -> Plan:
        """Placements are serialized in this process and committed optimistically: the
        transaction requires that no assignment, host status, rule or policy changed after
        the revision the plan was computed at, and that every new key is still absent."""
        t = self.client.transactions
        async with self._place_lock:
            for attempt in range(PLACE_ATTEMPTS):
                view = self.view()
                snap = view.snapshot
                plan = place(snap, Batch(tuple(vms), atomic=atomic))
                if atomic and plan.pending:
                    return plan
                now = time.time()
                puts = list(extra_puts)
                for vm in vms:
                    puts.append((keyspace.vm(vm.scope, vm.name), models.dumps(vm)))
                    host = plan.assignments.get(vm.key)
                    if host is None:
                        why = plan.pending.get(vm.key)
                        status = VMStatus(
                            scope=vm.scope,
                            name=vm.name,
                            phase=Phase.PENDING,
                            reason=why.summary() if why else "",
                            since=now,
                            explanation=why,
                        )
                    else:
                        status = VMStatus(
                            scope=vm.scope,
                            name=vm.name,
                            phase=Phase.SCHEDULED,
                            host=host,
                            epoch=1,
                            since=now,
                        )
                        assignment = Assignment(vm=vm, host=host, epoch=1)
                        puts.append(
                            (keyspace.assignment(host, vm.scope, vm.name), models.dumps(assignment))
                        )
                    puts.append((keyspace.vm_status(vm.scope, vm.name), models.dumps(status)))
                compares = [t.mod(_b(k)) == 0 for k in extra_absent]
                for prefix in _PLACEMENT_INPUTS:
                    span = t.mod(_b(prefix), _b(keyspace.prefix_end(prefix)))
                    compares.append(span < view.revision + 1)
                ok, revision = await self._txn(compares, puts, ())
                if ok:
                    await self.wait_for_revision(revision)
                    return plan
                # Another writer (a second coordinator in a race) won: back off with
                # jitter so two of them do not collide again in lockstep.
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                await self._catch_up()
                for key in extra_absent:
                    if await self.get(key) is not None:
                        raise Conflict(f"{key} was created by a concurrent request")
            raise Busy(f"placement kept conflicting after {PLACE_ATTEMPTS} attempts; retry")

    async def _catch_up(self) -> None:
        now = await self.client.get_prefix(_b(keyspace.CONFIG), keys_only=True)
        await self.wait_for_revision(now.header.revision)
