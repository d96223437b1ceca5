"""A list + watch cache of /hvplace/v1/ as typed records with their mod revisions; it resumes
its watch from its revision, relists after compaction and tells subscribers what changed.
Per event it also moves what decisions read (snapshot.Usage, the engine's hosts, the
unassigned set, phase and reason counts), so a snapshot costs O(1), not a rebuild."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Generic, NamedTuple, TypeVar

import immutables
import orjson
from hvplace.coordinator.snapshot import Derived, Snapshot, Usage
from hvplace.coordinator.store import Compacted, Store, WatchStream
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import HvplaceError, Unavailable
from hvplace.proto.records import (
    VM,
    Assignment,
    ClusterConfig,
    DomainStatus,
    Host,
    HostInfo,
    HostState,
    HostStatus,
    Migration,
    Phase,
    Rule,
    ScopePolicy,
    VMStatus,
)
from hvplace.runtime import heap

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
RELIST_PAGE = 5_000
RELIST_PAGE_BYTES = 8 * 1024 * 1024
"""A relist's pages: about 8 MiB each (a few per 100,000 records), 5,000 keys at least."""
YIELD_EVERY = 1024
"""A load hands the event loop a turn after this many keys (a few ms of decoding)."""
PROGRESS_AFTER_S = 0.1
"""Wait this long for events before asking etcd for a progress notification."""
RESYNC = "resync"
"""The type of the Change sent after a relist: subscribers must re-read everything."""


class Change(NamedTuple):
    """One change as the cache applied it. `name` is the record's key in its table (host
    name, `scope/vm`, `scope/rule`, scope); `record` is None for a delete."""

    kind: str
    type: str  # put | delete | resync
    key: str
    name: str
    record: object | None
    revision: int
    value: bytes = b""
    # (A named tuple: one is made per event of the watch, three per VM placed.)


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


_CACHED = frozenset({CONFIG, ASSIGNMENTS, DOMAINS, MIGRATIONS} | {kind for _p, kind, _c in _SIMPLE})

_FOLDER_OF: dict[str, tuple[str, bool]] = {
    k.value: (prefix, k in keyspace.HOSTED)
    for k, prefix in keyspace.PREFIXES.items()
    if k.value in _CACHED
}
"""Kind -> (its keys' folder, whether a host name comes first): a load names the keys
under the folder it is in without taking each apart."""
_RELISTED = (
    keyspace.VMS,
    keyspace.ASSIGNMENTS,
    *sorted({f for f, _h in _FOLDER_OF.values()} - {keyspace.VMS, keyspace.ASSIGNMENTS}),
    keyspace.CONFIG,
)
"""What a relist reads, in this order at one revision: the specs, then their assignments
(each then finds its spec decoded), then every other prefix the cache decodes; not the
election, request or image keys."""


def classify(key: str) -> tuple[str, str]:
    """(kind, name) of an etcd key (keyspace.classify); assignments and domains are named
    `scope/vm`; what the cache does not decode (election, requests, images) is `other`."""
    k = keyspace.classify(key)
    if k.kind in _CACHED:
        return k.kind.value, k.id
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
        # Specs and placements as immutable maps with the counters the engine reads
        # (capacity used per host, VMs per host and scope): a snapshot costs O(1).
        self.usage = Usage()
        # The engine's Host per name (registered, or named by records and lost), moved
        # per event; an unchanged host keeps its object, so the engine's host table too.
        self.engine_hosts: immutables.Map[str, Host] = immutables.Map()
        # VM keys with a spec and no assignment: what the controller places.
        self.unassigned: set[str] = set()
        # VMs per phase (a VM without a status is pending) and pending VMs' statuses per
        # first reason code: the metrics' gauges without a pass over every VM.
        self.phases: dict[str, int] = {phase.value: 0 for phase in Phase}
        self.pending_reasons: dict[str, int] = {}
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
        # During a load: each listed spec's bytes and the spec decoded from them (None if
        # malformed), by `scope/vm` (20 MB at 100,000 VMs, while their assignments list).
        self._listed: dict[str, tuple[bytes, VM | None]] = {}
        # While `load` fills a fresh cache: counters are built once at the end.
        self._loading = False

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

        async def pages() -> AsyncIterator[Iterable[tuple[str, bytes, int]]]:
            nonlocal revision
            async for _prefix, kvs, at in self.store.list_prefixes(
                _RELISTED, page=RELIST_PAGE, page_bytes=RELIST_PAGE_BYTES
            ):
                revision = at
                yield ((kv.key.decode(), kv.value, kv.mod_revision) for kv in kvs)

        # The collector stays off until the listing is frozen (see `load`): turned back on
        # sooner, the next allocations would set off a full collection over all of it.
        collecting = gc.isenabled()
        gc.disable()
        try:
            await fresh.load(pages())
            revision = await self._install(fresh, revision)
        finally:
            if collecting:
                gc.enable()
        log.info(
            "cache listed %d hosts, %d VMs at revision %d in %.2fs",
            len(self.hosts),
            len(self.vms),
            revision,
            time.monotonic() - started,
        )
        await self._advance(revision)

    async def _install(self, fresh: Cache, revision: int) -> int:
        """Swap in what `fresh` listed (at `revision`, or etcd's current one if it listed
        nothing); returns that revision."""
        if not revision:
            revision = await self.store.revision()
        old_hosts = self.hosts.records
        for name, table in fresh._tables().items():
            setattr(self, _ATTR[name], table)
        self.assigned_hosts = fresh.assigned_hosts
        self.usage = fresh.usage
        self.unassigned = fresh.unassigned
        self.phases = fresh.phases
        self.pending_reasons = fresh.pending_reasons
        self.config, self.config_rev = fresh.config, fresh.config_rev
        for name, info in old_hosts.items():
            if name not in self.hosts.records:
                self.departed[name] = info
        for name in list(self.departed):
            if name in self.hosts.records:
                del self.departed[name]
                self.gone_at.pop(name, None)
        self.engine_hosts = immutables.Map(
            (name, host)
            for name in {*self.hosts.records, *self.departed, *self.assigned_hosts}
            if (host := self._engine_host(name)) is not None
        )
        self._snapshot = None
        self.relists += 1
        # The listed records live as long as this listing: out of the collector's way,
        # a full collection no longer walks 100,000s of them (a 100+ ms pause per create
        # now and then at 100,000 VMs). Records are acyclic; refcounting still frees them.
        # (The listing ran with the collector off: it only allocates records.)
        gc.freeze()
        heap.trim()  # the pages' buffers, freed, would stay in the RSS
        return revision

    async def load(self, pages: AsyncIterator[Iterable[tuple[str, bytes, int]]]) -> None:
        """Fill this fresh cache from a listing: (key, value, mod revision) in key order,
        a page at a time. Tables and counters are built as dicts, then frozen."""
        self._loading = True
        # Decoding allocates millions of objects and frees none: each automatic full
        # collection would walk all of them again (seconds at 100,000 VMs).
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._load_pages(pages)
        finally:
            if collecting:
                gc.enable()

    async def _load_pages(self, pages: AsyncIterator[Iterable[tuple[str, bytes, int]]]) -> None:
        """`load` with the collector off (other tasks keep running; refcounting frees).
        Specs, their assignments and VM statuses (all but a few of a listing's records)
        go straight into the tables; the rest through `_apply`, as watch events do."""
        # An assignment decodes only its host and epoch when it carries exactly the bytes
        # of its spec listed before it: a third of a cold start's decoding. One listed
        # before its spec waits for it (a relist lists the specs first).
        held: list[tuple[str, bytes, int]] = []
        listed = self._listed
        vms, vm_revs = self.vms.records, self.vms.revs
        assignments, assignment_revs = self.assignments.records, self.assignments.revs
        statuses, status_revs = self.vm_status.records, self.vm_status.revs
        assigned_hosts = self.assigned_hosts
        decode_vm, decode_status = _decode_vm, _decode_status
        # The folder of the key before (keys come sorted, a folder at a time): the next
        # key under it needs no `classify`.
        folder, folder_len, by_host, kind = "", 0, False, OTHER
        done = 0
        async for page in pages:
            for key, value, mod_revision in page:
                done += 1
                if not done % YIELD_EVERY:
                    # gRPC moves the next page (requested before this one was handed
                    # over) only while the event loop runs: without this, not at all.
                    await asyncio.sleep(0)
                if folder and key.startswith(folder):
                    name = key[folder_len:]
                    if by_host:
                        name = name.partition("/")[2]
                else:
                    kind, name = classify(key)
                    folder, by_host = _FOLDER_OF.get(kind, ("", False))
                    folder_len = len(folder)
                try:
                    if kind == VMS:
                        try:
                            spec: VM = decode_vm(value)
                        except HvplaceError:
                            listed[name] = (value, None)  # its assignment: decoded in full
                            raise
                        assigned = assignments.get(name)
                        if assigned is not None and assigned.vm == spec:
                            spec = assigned.vm
                        vms[name] = spec
                        vm_revs[name] = mod_revision
                        listed[name] = (value, spec)
                    elif kind == VM_STATUS:
                        statuses[name] = decode_status(value)
                        status_revs[name] = mod_revision
                    elif kind == ASSIGNMENTS:
                        # Taken out: the spec's bytes are freed for the records after.
                        found = listed.pop(name, None)
                        if found is None:
                            held.append((key, value, mod_revision))
                            continue
                        a = _built_on(found[1], found[0], value)
                        if a is None:  # not built on its listed spec: decoded in full
                            self._apply("put", key, value, mod_revision)
                            continue
                        before = assignments.get(name)
                        if before is not None:
                            self._count(before.host, -1)
                        # `_count(a.host, 1)`, which refreshes no host while loading
                        assigned_hosts[a.host] = assigned_hosts.get(a.host, 0) + 1
                        assignments[name] = a
                        assignment_revs[name] = mod_revision
                    else:
                        self._apply("put", key, value, mod_revision)
                except HvplaceError as e:
                    # A malformed record is its writer's fault; the coordinator must go on.
                    log.warning("skipping malformed %s: %s", key, e)
            self._batch_specs.clear()  # a listing is no watch batch: hold no JSON
        for key, value, mod_revision in held:
            self._apply("put", key, value, mod_revision)
        held.clear()
        listed.clear()
        self._loading = False
        # The counters in one pass over the loaded tables (cheaper than per record).
        self.usage = Usage.build(vms, {k: a.host for k, a in assignments.items()})
        self.unassigned = {k for k in vms if k not in assignments}
        pending = Phase.PENDING
        phases = dict.fromkeys(self.phases, 0)
        reasons: dict[str, int] = {}
        for key in vms:
            status = statuses.get(key)
            phases[status.phase.value if status is not None else pending.value] += 1
        for status in statuses.values():
            if status.phase is pending:  # its spec or not, a pending status's reason counts
                why = status.explanation
                code = why.reasons[0].code if why is not None and why.reasons else "unknown"
                reasons[code] = reasons.get(code, 0) + 1
        self.phases, self.pending_reasons = phases, reasons

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
        tracked = kind in (VMS, VM_STATUS) and not self._loading
        if tracked:
            self._track(name, -1)
        try:
            record = self._apply_record(kind, name, key, put, value, mod_revision)
        except HvplaceError as e:
            # A malformed record is its writer's fault; the coordinator must go on.
            log.warning("skipping malformed %s: %s", key, e)
            return None
        finally:
            if tracked:
                self._track(name, 1)
        if kind != OTHER:
            self._snapshot = None
        if kind in (HOSTS, HOST_STATUS) and not self._loading:
            self._refresh_host(name)
        return Change(kind, type_, key, name, record, mod_revision, value)

    def _track(self, key: str, delta: int) -> None:
        """Move the phase and pending-reason counts by one VM's spec and status."""
        status = self.vm_status.records.get(key)
        if key in self.vms.records:
            phase = status.phase.value if status is not None else Phase.PENDING.value
            self.phases[phase] += delta
        if status is not None and status.phase is Phase.PENDING:
            why = status.explanation
            code = why.reasons[0].code if why is not None and why.reasons else "unknown"
            n = self.pending_reasons.get(code, 0) + delta
            if n:
                self.pending_reasons[code] = n
            else:
                del self.pending_reasons[code]

    def _engine_host(self, name: str) -> Host | None:
        """The engine's Host for `name` as `host_infos` and `Snapshot.from_records` make
        it: registered with its status, else (named by records) lost."""
        info = self.hosts.records.get(name)
        if info is not None:
            return Host.from_records(info, self.host_status.records.get(name))
        if name in self.departed or name in self.assigned_hosts:
            last = self.departed.get(name) or HostInfo(name=name)
            return Host(
                name=last.name,
                labels=last.labels,
                capacity=last.capacity,
                ratios=last.ratios,
                reserved_memory_mib=last.reserved_memory_mib,
                state=HostState.LOST,
            )
        return None

    def _refresh_host(self, name: str) -> None:
        host = self._engine_host(name)
        old = self.engine_hosts.get(name)
        if host is None:
            if old is not None:
                self.engine_hosts = self.engine_hosts.delete(name)
        elif old != host:
            self.engine_hosts = self.engine_hosts.set(name, host)

    def _apply_record(
        self, kind: str, name: str, key: str, put: bool, value: bytes, mod_revision: int
    ) -> object | None:
        if kind == OTHER:
            return None
        if kind == CONFIG:
            self.config = codec.loads(ClusterConfig, value) if put else None
            self.config_rev = mod_revision if put else 0
            return self.config
        if kind == MIGRATIONS:
            if not put:
                self.migrations.pop(name)
                return None
            m = codec.loads(Migration, value)
            self.migrations.put(name, m, mod_revision)
            return m
        if kind in (ASSIGNMENTS, DOMAINS):
            host = keyspace.classify(key).host
            table: Table[Any] = self.assignments if kind == ASSIGNMENTS else self.domains
            if not put:
                # The old host's key deleted after a move must not drop the new one.
                current = table.records.get(name)
                if current is not None and current.host == host:
                    table.pop(name)
                    if kind == ASSIGNMENTS and not self._loading:
                        self._count(host, -1)
                        self.usage.set_placement(name, None)
                        if name in self.vms.records:
                            self.unassigned.add(name)
                return None
            if kind == ASSIGNMENTS:
                spec = self._batch_specs.get(name)
                hinted = self._expected.pop(key, None)
                a: Assignment
                listed = self._listed_assignment(name, value)
                if hinted is not None and hinted[0] == value and isinstance(hinted[1], Assignment):
                    a = hinted[1]
                elif listed is not None:
                    a = listed
                elif spec is not None:
                    # Written with its spec in one transaction (the planner's commits):
                    # reuse the spec just decoded instead of decoding the VM again.
                    a = codec.loads_assignment(value, spec[1], spec[0])
                else:
                    a = codec.loads(Assignment, value)
                shared = self.vms.records.get(name)
                if shared is not None and a.vm is not shared and shared == a.vm:
                    # One VM object for the spec and its assignment's copy (memory).
                    a = dataclasses.replace(a, vm=shared)
                before = self.assignments.records.get(name)
                if before is not None:
                    self._count(before.host, -1)
                self._count(a.host, 1)
                if not self._loading:
                    self.usage.set_placement(name, a.host)
                    self.unassigned.discard(name)
                self.assignments.put(name, a, mod_revision)
                return a
            d = codec.loads(DomainStatus, value)
            self.domains.put(name, d, mod_revision)
            return d
        cls = _CLASSES[kind]
        table = self._tables()[kind]
        if not put:
            gone = table.pop(name)
            if kind == HOSTS and gone is not None:
                self.departed[name] = gone
                self.gone_at[name] = self.clock()
            elif kind == VMS:
                self.usage.set_vm(name, None)
                self.unassigned.discard(name)
            return None
        hinted = self._expected.pop(key, None)
        rec: object = (
            hinted[1] if hinted is not None and hinted[0] == value else codec.loads(cls, value)
        )
        if kind == VMS:
            assigned = self.assignments.records.get(name)
            if assigned is not None and assigned.vm == rec:
                rec = assigned.vm
            self._batch_specs[name] = (value, rec)  # type: ignore[assignment]
            if not self._loading:
                self.usage.set_vm(name, rec)  # type: ignore[arg-type]
                if name not in self.assignments.records:
                    self.unassigned.add(name)
        elif kind == HOSTS:
            self.departed.pop(name, None)
            self.gone_at.pop(name, None)
        table.put(name, rec, mod_revision)
        return rec

    def _listed_assignment(self, name: str, value: bytes) -> Assignment | None:
        """During a load: the assignment built on the spec already decoded when it
        embeds that spec's listed bytes (`_built_on`); else None."""
        found = self._listed.get(name)
        return None if found is None else _built_on(found[1], found[0], value)

    def _count(self, host: str, delta: int) -> None:
        before = host in self.assigned_hosts
        n = self.assigned_hosts.get(host, 0) + delta
        if n > 0:
            self.assigned_hosts[host] = n
        else:
            self.assigned_hosts.pop(host, None)
        if before != (n > 0) and not self._loading:
            self._refresh_host(host)

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

    @property
    def placements(self) -> Mapping[str, str]:
        """VM key -> host of its assignment (an immutable map, in step with `assignments`)."""
        return self.usage.placements

    def snapshot(self) -> Snapshot:
        """The engine's view now; hosts without a registration are `lost`. O(rules): the
        hosts, specs and placements are the maps kept per event, not copies."""
        if self._snapshot is None or self._snapshot.revision != self.revision:
            self._snapshot = Snapshot(
                revision=self.revision,
                hosts=self.engine_hosts,
                vms=self.usage.vms,
                placements=self.usage.placements,
                rules={r.key: r for r in self.rules.records.values()},
                policies={p.scope: p for p in self.policies.records.values()},
                reservations={k: m.target for k, m in self.migrations.records.items()},
                derived=Derived.of(self.usage),
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


def _built_on(spec: VM | None, spec_json: bytes, value: bytes) -> Assignment | None:
    """The assignment `value` encodes, built on `spec` (decoded from `spec_json`) when
    `value` is `{"epoch":E,"host":H,"vm":<spec_json>}` to the byte, E an integer and H a
    string; else None (then decoded in full): what `codec.loads` would give, without
    decoding the VM a second time."""
    at = len(value) - 1 - len(spec_json)  # where the spec's bytes would start
    if (
        spec is None
        or not value.endswith(b"}")
        or not value.endswith(spec_json, 0, len(value) - 1)
        or not value.endswith(b',"vm":', 0, at)
    ):
        return None
    try:
        head = orjson.loads(value[: at - 6] + b"}")
    except orjson.JSONDecodeError:
        return None
    if type(head) is not dict or len(head) != 2:
        return None
    host, epoch = head.get("host"), head.get("epoch")
    if type(host) is not str or type(epoch) is not int:
        return None
    return Assignment(spec, host, epoch)


_decode_vm = codec.decoder(VM)
_decode_status = codec.decoder(VMStatus)


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
