"""A list + watch cache of /hvplace/v1/ as typed records with their mod revisions; it resumes
its watch from its revision, relists after compaction and tells subscribers what changed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hvplace.coordinator.snapshot import Snapshot
from hvplace.coordinator.store import Compacted, Store, WatchStream
from hvplace.proto import keyspace, models
from hvplace.proto.errors import HvplaceError, Unavailable
from hvplace.proto.models import (
    VM,
    Assignment,
    ClusterConfig,
    DomainStatus,
    HostInfo,
    HostStatus,
    Migration,
    Rule,
    ScopePolicy,
    VMStatus,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

WAIT_S = 10.0
"""How long `wait_for_revision` waits for the watch to show a revision before `Unavailable`."""

# Kinds of records, named after their keyspace folder.
HOSTS = "hosts"
HOST_STATUS = "host_status"
VMS = "vms"
VM_STATUS = "vm_status"
ASSIGNMENTS = "assignments"
DOMAINS = "domains"
RULES = "rules"
POLICIES = "policies"
CONFIG = "config"
MIGRATIONS = "migrations"
OTHER = "other"  # election and request keys: notified, not decoded
PROGRESS_AFTER_S = 0.1
"""Wait this long for events before asking etcd for a progress notification."""
RESYNC = "resync"
"""The type of the Change sent after a relist: subscribers must re-read everything."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change as the cache applied it. `name` is the record's key in its table (host
    name, `scope/vm`, `scope/rule`, scope); `record` is None for a delete."""

    kind: str
    type: str  # put | delete | resync
    key: str
    name: str
    record: object | None
    revision: int
    value: bytes = b""


class Table(Generic[T]):
    """Records of one kind by name, with the mod revision of each one's etcd key."""

    __slots__ = ("records", "revs")

    def __init__(self) -> None:
        self.records: dict[str, T] = {}
        self.revs: dict[str, int] = {}

    def put(self, name: str, record: T, mod_revision: int) -> None:
        self.records[name] = record
        self.revs[name] = mod_revision

    def pop(self, name: str) -> T | None:
        self.revs.pop(name, None)
        return self.records.pop(name, None)

    def __len__(self) -> int:
        return len(self.records)


_SIMPLE: tuple[tuple[str, str, type[Any]], ...] = (
    (keyspace.HOSTS, HOSTS, HostInfo),
    (keyspace.HOST_STATUS, HOST_STATUS, HostStatus),
    (keyspace.VMS, VMS, VM),
    (keyspace.VM_STATUS, VM_STATUS, VMStatus),
    (keyspace.RULES, RULES, Rule),
    (keyspace.POLICIES, POLICIES, ScopePolicy),
)


def classify(key: str) -> tuple[str, str]:
    """(kind, name) of an etcd key; assignments and domains are named `scope/vm`."""
    if key == keyspace.CONFIG:
        return CONFIG, ""
    for prefix, kind in (
        (keyspace.ASSIGNMENTS, ASSIGNMENTS),
        (keyspace.DOMAINS, DOMAINS),
        (keyspace.MIGRATIONS, MIGRATIONS),
    ):
        if key.startswith(prefix):
            parts = key[len(prefix) :].split("/", 1)
            return kind, parts[1] if len(parts) == 2 else ""
    for prefix, kind, _cls in _SIMPLE:
        if key.startswith(prefix):
            return kind, key[len(prefix) :]
    return OTHER, key


class Cache:
    """The coordinator's in-memory copy of the keyspace. Reads are synchronous and
    consistent with `revision`; `start()` lists, then a task follows the watch."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.revision = 0
        self.hosts: Table[HostInfo] = Table()
        self.host_status: Table[HostStatus] = Table()
        self.vms: Table[VM] = Table()
        self.vm_status: Table[VMStatus] = Table()
        self.assignments: Table[Assignment] = Table()
        self.domains: Table[DomainStatus] = Table()
        self.rules: Table[Rule] = Table()
        self.policies: Table[ScopePolicy] = Table()
        # Live migrations in flight by VM key (each stored under both hosts).
        self.migrations: Table[Migration] = Table()
        self.config: ClusterConfig | None = None
        self.config_rev = 0
        # A host whose registration (lease) is gone keeps its last HostInfo here, so the
        # engine still sees it, as lost, with the VMs assigned to it.
        self.departed: dict[str, HostInfo] = {}
        # When this process saw a host's registration deleted (its clock): evidence that
        # the lease had expired by then. A host found absent without a delete has none.
        self.gone_at: dict[str, float] = {}
        # Assignments per host, kept in step with `assignments`: which hosts the records
        # name, without a pass over every VM.
        self.assigned_hosts: dict[str, int] = {}
        # VM key -> host of its assignment, in step with `assignments`: the snapshot's
        # placements are a copy of it, not a pass over every assignment.
        self.placements: dict[str, str] = {}
        self.relists = 0
        self._snapshot: Snapshot | None = None
        self._advanced = asyncio.Condition()
        self._subscribers: set[asyncio.Queue[Change]] = set()
        self._listeners: list[Callable[[Change], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._stream: WatchStream | None = None
        self.synced = asyncio.Event()
        # VM specs put in the watch batch being applied, with their JSON (see _apply_record).
        self._batch_specs: dict[str, tuple[bytes, VM]] = {}
        # Records this process is writing, by key: (the bytes, the record). When the watch
        # shows exactly those bytes the record is taken as is, not decoded again.
        self._expected: dict[str, tuple[bytes, object]] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self._relist()
        self._task = asyncio.create_task(self._follow(), name="hvplace-cache-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._stream is not None:
            await self._stream.close()
            self._stream = None

    def _tables(self) -> dict[str, Table[Any]]:
        return {
            HOSTS: self.hosts,
            HOST_STATUS: self.host_status,
            VMS: self.vms,
            VM_STATUS: self.vm_status,
            ASSIGNMENTS: self.assignments,
            DOMAINS: self.domains,
            RULES: self.rules,
            POLICIES: self.policies,
            MIGRATIONS: self.migrations,
        }

    async def _relist(self) -> None:
        """Read the whole keyspace at one revision into fresh tables, then swap them in."""
        started = time.monotonic()
        fresh = Cache(self.store)
        revision = 0
        async for kvs, at in self.store.list_pages(keyspace.ROOT):
            revision = at
            for kv in kvs:
                fresh._apply("put", kv.key.decode(), kv.value, int(kv.mod_revision))
            fresh._batch_specs.clear()  # a listing is no watch batch: hold no JSON
        if not revision:
            revision = await self.store.revision()
        old_hosts = self.hosts.records
        for name, table in fresh._tables().items():
            setattr(self, _ATTR[name], table)
        self.assigned_hosts = fresh.assigned_hosts
        self.placements = fresh.placements
        self.config, self.config_rev = fresh.config, fresh.config_rev
        for name, info in old_hosts.items():
            if name not in self.hosts.records:
                self.departed[name] = info
        for name in list(self.departed):
            if name in self.hosts.records:
                del self.departed[name]
                self.gone_at.pop(name, None)
        self._snapshot = None
        self.relists += 1
        log.info(
            "cache listed %d hosts, %d VMs at revision %d in %.2fs",
            len(self.hosts),
            len(self.vms),
            revision,
            time.monotonic() - started,
        )
        await self._advance(revision)

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            try:
                self._stream = await self.store.watch(keyspace.ROOT, self.revision + 1)
                self.synced.set()
                backoff = 0.1
                async for batch in self._stream:
                    for ev in batch.events:
                        change = self._apply(ev.type, ev.key, ev.value, ev.mod_revision)
                        if change is not None:
                            self._notify(change)
                    self._batch_specs.clear()
                    await self._advance(batch.revision)
            except Compacted as e:
                log.warning("%s; relisting", e)
                await self._close_stream()
                try:
                    await self._relist()
                except Unavailable as err:
                    log.warning("relist failed: %s", err)
                    await asyncio.sleep(backoff)
                    continue
                self._notify(Change(RESYNC, RESYNC, keyspace.ROOT, "", None, self.revision))
            except Unavailable as e:
                log.warning("cache watch broke: %s; resuming from revision %d", e, self.revision)
                await self._close_stream()
                self.synced.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _close_stream(self) -> None:
        if self._stream is not None:
            await self._stream.close()
            self._stream = None

    async def _advance(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            async with self._advanced:
                self._advanced.notify_all()

    # ------------------------------------------------------------------ applying

    def _apply(self, type_: str, key: str, value: bytes, mod_revision: int) -> Change | None:
        kind, name = classify(key)
        put = type_ == "put"
        record: object | None = None
        try:
            record = self._apply_record(kind, name, key, put, value, mod_revision)
        except HvplaceError as e:
            # A malformed record is its writer's fault; the coordinator must go on.
            log.warning("skipping malformed %s: %s", key, e)
            return None
        if kind != OTHER:
            self._snapshot = None
        return Change(kind, type_, key, name, record, mod_revision, value)

    def _apply_record(
        self, kind: str, name: str, key: str, put: bool, value: bytes, mod_revision: int
    ) -> object | None:
        if kind == OTHER:
            return None
        if kind == CONFIG:
            self.config = models.loads(ClusterConfig, value) if put else None
            self.config_rev = mod_revision if put else 0
            return self.config
        if kind == MIGRATIONS:
            if not put:
                self.migrations.pop(name)
                return None
            m = models.loads(Migration, value)
            self.migrations.put(name, m, mod_revision)
            return m
        if kind in (ASSIGNMENTS, DOMAINS):
            prefix = keyspace.ASSIGNMENTS if kind == ASSIGNMENTS else keyspace.DOMAINS
            host = key[len(prefix) :].split("/", 1)[0]
            table: Table[Any] = self.assignments if kind == ASSIGNMENTS else self.domains
            if not put:
                # The old host's key deleted after a move must not drop the new one.
                current = table.records.get(name)
                if current is not None and current.host == host:
                    table.pop(name)
                    if kind == ASSIGNMENTS:
                        self._count(host, -1)
                        self.placements.pop(name, None)
                return None
            if kind == ASSIGNMENTS:
                spec = self._batch_specs.get(name)
                hinted = self._expected.pop(key, None)
                a: Assignment
                if hinted is not None and hinted[0] == value and isinstance(hinted[1], Assignment):
                    a = hinted[1]
                elif spec is not None:
                    # Written with its spec in one transaction (the planner's commits):
                    # reuse the spec just decoded instead of decoding the VM again.
                    a = models.loads_assignment(value, spec[1], spec[0])
                else:
                    a = models.loads(Assignment, value)
                shared = self.vms.records.get(name)
                if shared is not None and a.vm is not shared and shared == a.vm:
                    # One VM object for the spec and its assignment's copy (memory).
                    a = dataclasses.replace(a, vm=shared)
                before = self.assignments.records.get(name)
                if before is not None:
                    self._count(before.host, -1)
                self._count(a.host, 1)
                self.placements[name] = a.host
                self.assignments.put(name, a, mod_revision)
                return a
            d = models.loads(DomainStatus, value)
            self.domains.put(name, d, mod_revision)
            return d
        cls = _CLASSES[kind]
        table = self._tables()[kind]
        if not put:
            gone = table.pop(name)
            if kind == HOSTS and gone is not None:
                self.departed[name] = gone
                self.gone_at[name] = self.clock()
            return None
        hinted = self._expected.pop(key, None)
        rec: object = (
            hinted[1] if hinted is not None and hinted[0] == value else models.loads(cls, value)
        )
        if kind == VMS:
            assigned = self.assignments.records.get(name)
            if assigned is not None and assigned.vm == rec:
                rec = assigned.vm
            self._batch_specs[name] = (value, rec)  # type: ignore[assignment]
        elif kind == HOSTS:
            self.departed.pop(name, None)
            self.gone_at.pop(name, None)
        table.put(name, rec, mod_revision)
        return rec

    def _count(self, host: str, delta: int) -> None:
        n = self.assigned_hosts.get(host, 0) + delta
        if n > 0:
            self.assigned_hosts[host] = n
        else:
            self.assigned_hosts.pop(host, None)

    def _notify(self, change: Change) -> None:
        for q in list(self._subscribers):
            q.put_nowait(change)
        for fn in list(self._listeners):
            fn(change)

    # ------------------------------------------------------------------ reading

    def add_listener(self, fn: Callable[[Change], None]) -> Callable[[], None]:
        """Call `fn` synchronously on every change; returns the function that removes it."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    async def subscribe(self) -> AsyncIterator[Change]:
        """Every change applied from now on, in revision order."""
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    async def wait_for_revision(self, revision: int, timeout_s: float = WAIT_S) -> None:
        """Return once the cache has applied everything up to `revision`."""
        if self.revision >= revision:
            return
        deadline = time.monotonic() + timeout_s
        while self.revision < revision:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(
                    f"the coordinator's cache is at revision {self.revision}, not {revision}"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, PROGRESS_AFTER_S)), self._advanced:
                    await self._advanced.wait_for(lambda: self.revision >= revision)
            # Nothing under our prefix may change again: a progress notification tells
            # the watch that etcd's revision moved on with nothing missed. Asked only
            # after a pause, because etcd 3.4 can answer it a moment before it queues
            # the events of the latest write (etcd#15220).
            if self.revision < revision and self._stream is not None:
                self._stream.request_progress()

    async def fresh(self) -> None:
        """Catch up with etcd's revision as of now (a linearizable read, then wait)."""
        await self.wait_for_revision(await self.store.revision())

    def alive(self) -> set[str]:
        return set(self.hosts.records)

    def unregistered(self) -> set[str]:
        """Hosts that records name (assignments, statuses, a registration seen to go) and
        that have no registration now: lost, or about to be (level-triggered)."""
        named = set(self.assigned_hosts) | set(self.host_status.records) | set(self.departed)
        return {n for n in named if n not in self.hosts.records}

    def host_infos(self) -> list[HostInfo]:
        """Registered hosts, then unregistered ones that records name: with their last
        registration when this process saw one, else a bare name (no capacity)."""
        infos = list(self.hosts.records.values())
        named = set(self.departed) | set(self.assigned_hosts)
        for name in sorted(n for n in named if n not in self.hosts.records):
            info = self.departed.get(name)
            infos.append(info if info is not None else HostInfo(name=name))
        return infos

    def snapshot(self) -> Snapshot:
        """The engine's view now; hosts without a registration are `lost`."""
        if self._snapshot is None or self._snapshot.revision != self.revision:
            self._snapshot = Snapshot.from_records(
                revision=self.revision,
                infos=self.host_infos(),
                statuses=self.host_status.records,
                vms=self.vms.records,
                assignments=(),
                placements=self.placements,
                rules=self.rules.records.values(),
                policies=self.policies.records.values(),
                alive=self.hosts.records,
                reservations={k: m.target for k, m in self.migrations.records.items()},
            )
        return self._snapshot

    def expect(self, writes: Mapping[str, tuple[bytes, object]]) -> None:
        """Records about to be written (bytes and the record they encode): the watch
        event with those very bytes then costs no decoding."""
        self._expected.update(writes)

    def forget(self, keys: Iterable[str]) -> None:
        """Writes that did not happen (a failed transaction)."""
        for key in keys:
            self._expected.pop(key, None)

    def cluster_config(self) -> ClusterConfig:
        return self.config if self.config is not None else ClusterConfig()

    def assignment_key(self, vm_key: str) -> tuple[str, int] | None:
        """The etcd key of a VM's current assignment and its mod revision."""
        a = self.assignments.records.get(vm_key)
        if a is None:
            return None
        return (
            keyspace.assignment(a.host, a.vm.scope, a.vm.name),
            self.assignments.revs[vm_key],
        )


_ATTR = {
    HOSTS: "hosts",
    HOST_STATUS: "host_status",
    VMS: "vms",
    VM_STATUS: "vm_status",
    ASSIGNMENTS: "assignments",
    DOMAINS: "domains",
    RULES: "rules",
    POLICIES: "policies",
    MIGRATIONS: "migrations",
}
_CLASSES: dict[str, type[Any]] = {kind: cls for _p, kind, cls in _SIMPLE}
