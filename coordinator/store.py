"""The coordinator's one seam to etcd: typed reads, fenced optimistic transactions, the one
read-modify-write helper (`update`, over a `Txn`) and its retry policy, leases and a
resumable watch (over hvplace.runtime.etcd's client)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

from aetcd import rpc
from hvplace.proto import keyspace
from hvplace.proto.errors import Busy, Interrupted, Unavailable
from hvplace.runtime.etcd import Compacted as Compacted
from hvplace.runtime.etcd import EtcdAuth, EtcdClient, EtcdTLS, TooLarge
from hvplace.runtime.etcd import WatchBatch as WatchBatch
from hvplace.runtime.etcd import WatchEvent as WatchEvent
from hvplace.runtime.etcd import WatchStream as WatchStream

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Retry:
    """How an optimistic write retries a conflict: at most `attempts` tries, each after a
    jittered pause growing by `backoff_s` (two writers do not collide again in lockstep)."""

    attempts: int
    backoff_s: float

    async def pause(self, attempt: int) -> None:
        """Before retry number `attempt` + 1 (attempt counts from 0)."""
        await asyncio.sleep(random.uniform(0, self.backoff_s * (attempt + 1)))


CONFLICT_RETRY = Retry(attempts=10, backoff_s=0.005)
"""The one retry policy of every optimistic write, records (`Store.update`) and plans
(`Planner`) alike. k8s GuaranteedUpdate retries until it wins and Nomad's plan applier is
bounded likewise: bounded, so a hot key answers `busy` instead of spinning."""

LIST_PAGE = 5_000
"""Keys per range request when listing: keeps each response far below gRPC's message cap."""


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Fence:
    """The leader's election key and its create revision: the fencing token. A fenced
    commit compares it, so a deposed leader's write is rejected by etcd itself."""

    key: str
    revision: int


class Compare(NamedTuple):
    """`key`'s mod revision equals `mod_revision` (0: the key is absent); with `prefix`,
    no key under the prefix changed after `mod_revision` (mod revision ≤ it)."""

    key: str
    mod_revision: int
    prefix: bool = False

    @classmethod
    def unchanged(cls, key: str, mod_revision: int) -> Compare:
        return cls(key, mod_revision)

    @classmethod
    def absent(cls, key: str) -> Compare:
        return cls(key, 0)

    @classmethod
    def prefix_unchanged_since(cls, prefix: str, revision: int) -> Compare:
        return cls(prefix, revision, prefix=True)


class FenceLost(Interrupted):
    """A fenced commit was rejected because the fencing token is no longer the leader's."""


class Txn:
    """The reads and writes of one attempt of a read-modify-write (etcd's concurrency STM):
    every key read is compared at commit with the revision it was read at (a key read as
    absent must still be absent), so the writes land only on the state they were decided
    from. Writes are buffered until the commit; a key is read from etcd once per attempt."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._read: dict[str, tuple[bytes | None, int]] = {}
        self.puts: dict[str, bytes] = {}
        self.deletes: dict[str, None] = {}  # ordered set

    async def get(self, key: str) -> bytes | None:
        """The key's value (None: absent), from etcd (linearizable) on the first read."""
        if key not in self._read:
            kv = await self._store.get(key)
            self._read[key] = (kv.value, kv.mod_revision) if kv is not None else (None, 0)
        return self._read[key][0]

    def require_absent(self, key: str) -> None:
        """The commit requires `key` to be absent, without reading it."""
        if self._read.get(key, (None, 0))[1]:
            raise ValueError(f"{key} was read present; it cannot be required absent")
        self._read[key] = (None, 0)

    def require_revision(self, key: str, mod_revision: int) -> None:
        """The commit requires `key` at `mod_revision` (0: absent) as read elsewhere (the
        cache), without reading it again; `get` then answers None for it."""
        self._read[key] = (None, mod_revision)

    def fork(self) -> Txn:
        """A new transaction that requires the same reads, without the writes (a batch
        committed in several transactions, each under the same preconditions)."""
        twin = Txn(self._store)
        twin._read = dict(self._read)
        return twin

    def put(self, key: str, value: bytes) -> None:
        self.deletes.pop(key, None)
        self.puts[key] = value

    def delete(self, key: str) -> None:
        self.puts.pop(key, None)
        self.deletes[key] = None

    @property
    def writes(self) -> bool:
        return bool(self.puts or self.deletes)

    @property
    def compares(self) -> list[Compare]:
        """What the commit requires: every key as it was read."""
        return [Compare.unchanged(k, rev) for k, (_v, rev) in self._read.items()]


@dataclass(frozen=True, slots=True)
class Updated(Generic[T]):
    """What an update function returned, and the revision its writes were committed at
    (0: it wrote nothing)."""

    result: T
    revision: int


def _kv(raw: Any) -> KV:
    return KV(
        key=raw.key.decode(),
        value=bytes(raw.value),
        create_revision=int(raw.create_revision),
        mod_revision=int(raw.mod_revision),
        lease=int(raw.lease),
    )


def _sampled_size(kvs: list[Any]) -> int:
    """About the bytes of these keys and values, from 64 of them spread over the page
    (the whole response's ByteSize costs a pass in C over every one)."""
    sample = kvs[:: max(1, len(kvs) // 64)]
    return sum(len(kv.key) + len(kv.value) for kv in sample) * len(kvs) // len(sample)


def _range_end(prefix: str) -> bytes:
    return keyspace.prefix_end(prefix).encode()


class Store:
    """etcd for the coordinator. Every unary call is bounded by `timeout`; etcd or network
    failures surface as `Unavailable`, compare failures as a falsy commit result."""

    def __init__(self, etcd: EtcdClient, timeout: float) -> None:
        self.etcd = etcd
        self._timeout = timeout
        self.conflicts = 0
        self.on_conflict: Callable[[], None] | None = None
        self.on_fence_lost: Callable[[Fence], None] | None = None

    @classmethod
    async def connect(
        cls,
        endpoints: Sequence[str],
        *,
        timeout: float,  # noqa: ASYNC109
        tls: EtcdTLS | None = None,
        auth: EtcdAuth | None = None,
    ) -> Store:
        """Every member in `endpoints`; calls move to another member when one fails."""
        return cls(EtcdClient(endpoints, tls=tls, auth=auth), timeout)

    async def close(self) -> None:
        await self.etcd.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> KV | None:
        resp = await self.etcd.range(rpc.RangeRequest(key=key.encode()), timeout_s=self._timeout)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def revision(self) -> int:
        """etcd's current revision (a linearizable read)."""
        resp = await self.etcd.range(
            rpc.RangeRequest(key=keyspace.CONFIG.encode(), count_only=True), timeout_s=self._timeout
        )
        return int(resp.header.revision)

    async def list_pages(
        self,
        prefix: str,
        *,
        keys_only: bool = False,
        page: int = LIST_PAGE,
        page_bytes: int = 0,
        revision: int = 0,
        start_at: str = "",
        end_before: str = "",
    ) -> AsyncIterator[tuple[list[Any], int]]:
        """Every key under `prefix` at one revision (`revision`, or etcd's current one), a
        page at a time, as etcd's raw KeyValue messages (the cache decodes them without
        keeping a second copy). `start_at` / `end_before` narrow the range within it.
        `page` keys per request; with `page_bytes`, see `list_prefixes`."""
        start = (start_at or prefix).encode()
        end = end_before.encode() if end_before else _range_end(prefix)
        async for _index, kvs, at in self._pages(
            [(start, end)], keys_only=keys_only, page=page, page_bytes=page_bytes, revision=revision
        ):
            yield kvs, at

    async def list_prefixes(
        self, prefixes: Sequence[str], *, page: int = LIST_PAGE, page_bytes: int = 0
    ) -> AsyncIterator[tuple[str, list[Any], int]]:
        """Every key under each of `prefixes` in turn, all at etcd's revision of the first
        request: (prefix, a page of raw KeyValue messages, revision).

        The next page, of this prefix or the next one, is asked for before this one is
        handed over: etcd reads it while the caller decodes (the caller must let the event
        loop run now and then meanwhile: gRPC moves the answer only then). With
        `page_bytes`, pages grow (twice the keys of the one before at most) to about that
        many bytes by the mean size of the prefix's keys read so far (`page` keys at least),
        and a prefix's first page has the size the one before reached: etcd 3.4 walks its
        index from a page's first key to the range's end on every request, so at 100,000
        keys fewer, larger pages cost it far less."""
        ranges = [(p.encode(), _range_end(p)) for p in prefixes]
        async for index, kvs, at in self._pages(
            ranges, keys_only=False, page=page, page_bytes=page_bytes, revision=0
        ):
            yield prefixes[index], kvs, at

    async def _pages(
        self,
        ranges: Sequence[tuple[bytes, bytes]],
        *,
        keys_only: bool,
        page: int,
        page_bytes: int,
        revision: int,
    ) -> AsyncIterator[tuple[int, list[Any], int]]:
        """(index of the range, a page of it, revision): the ranges in turn at one
        revision, the next request always in flight while the caller has a page."""
        timeout_s = max(self._timeout, 30.0)
        index = 0
        start = ranges[0][0]
        limit = page
        seen_keys = seen_bytes = 0

        def fetch() -> asyncio.Task[Any]:
            req = rpc.RangeRequest(
                key=start,
                range_end=ranges[index][1],
                limit=limit,
                revision=revision,
                keys_only=keys_only,
            )
            return asyncio.ensure_future(self.etcd.range(req, timeout_s=timeout_s))

        pending = fetch()
        try:
            while True:
                try:
                    resp = await pending
                except TooLarge:
                    # Keys larger than those before them (or a `page` too large for them):
                    # ask again for a quarter as many.
                    if limit <= 1:
                        raise
                    limit = max(1, limit // 4)
                    pending = fetch()
                    continue
                revision = revision or int(resp.header.revision)
                kvs = list(resp.kvs)
                listed = index
                if resp.more and kvs:
                    if page_bytes:
                        # Twice the keys at most: the caller decodes this page while etcd
                        # reads the next, so etcd never has much more to read than that.
                        seen_keys += len(kvs)
                        seen_bytes += _sampled_size(kvs)
                        by_bytes = page_bytes * seen_keys // max(seen_bytes, 1)
                        limit = max(page, min(2 * limit, by_bytes))
                    start = kvs[-1].key + b"\x00"
                else:
                    index += 1
                    if index == len(ranges):
                        yield listed, kvs, revision
                        return
                    # The next prefix starts at the page size this one reached (too large
                    # for its keys: a quarter, on etcd's or the client's refusal).
                    start, seen_keys, seen_bytes = ranges[index][0], 0, 0
                pending = fetch()
                yield listed, kvs, revision
        finally:
            if not pending.done():
                pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Unavailable):
                await pending  # retrieved, so asyncio reports no lost exception

    async def list_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under `prefix` and the revision they were read at."""
        out: list[KV] = []
        revision = 0
        async for kvs, at in self.list_pages(prefix):
            out.extend(_kv(kv) for kv in kvs)
            revision = at
        if not revision:
            revision = await self.revision()
        return out, revision

    async def first_created(self, prefix: str) -> KV | None:
        """The key under `prefix` with the lowest create revision (election's leader)."""
        req = rpc.RangeRequest(
            key=prefix.encode(),
            range_end=_range_end(prefix),
            limit=1,
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.CREATE,
        )
        resp = await self.etcd.range(req, timeout_s=self._timeout)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def last_created_before(self, prefix: str, revision: int) -> KV | None:
        """The key under `prefix` created last before `revision` (election's predecessor)."""
        req = rpc.RangeRequest(
            key=prefix.encode(),
            range_end=_range_end(prefix),
            limit=1,
            sort_order=rpc.RangeRequest.DESCEND,
            sort_target=rpc.RangeRequest.CREATE,
            max_create_revision=revision - 1,
        )
        resp = await self.etcd.range(req, timeout_s=self._timeout)
        return _kv(resp.kvs[0]) if resp.kvs else None

    # ------------------------------------------------------------------ writes

    async def commit(
        self,
        compares: Sequence[Compare],
        puts: Mapping[str, bytes],
        deletes: Sequence[str] = (),
        *,
        fence: Fence | None,
        lease: int = 0,
    ) -> int:
        """One transaction: if every compare holds (and the fence, when given), apply the
        puts (on `lease` when non-zero) and deletes. Returns the revision it committed at,
        0 (falsy) when a compare failed and nothing was written. Raises FenceLost when the
        fence itself failed."""
        req = rpc.TxnRequest()
        # Filled in place: a quarter of the time of building each part and copying it in
        # (a planner's transaction compares a key and puts three per VM placed).
        add_compare = req.compare.add
        for c in compares:
            cmp = add_compare()
            cmp.key = c.key.encode()
            cmp.target = rpc.Compare.MOD
            if c.prefix:
                cmp.range_end = _range_end(c.key)
                cmp.result = rpc.Compare.LESS
                cmp.mod_revision = c.mod_revision + 1
            else:
                cmp.result = rpc.Compare.EQUAL
                cmp.mod_revision = c.mod_revision
        if fence is not None:
            held = add_compare()
            held.key = fence.key.encode()
            held.target = rpc.Compare.CREATE
            held.result = rpc.Compare.EQUAL
            held.create_revision = fence.revision
            req.failure.add().request_range.key = fence.key.encode()
        add = req.success.add
        for k, v in puts.items():
            put = add().request_put
            put.key = k.encode()
            put.value = v
            if lease:
                put.lease = lease
        for k in deletes:
            add().request_delete_range.key = k.encode()
        resp = await self.etcd.txn(req, timeout_s=self._timeout)
        if resp.succeeded:
            return int(resp.header.revision)
        if fence is not None:
            held = resp.responses[0].response_range.kvs
            if not held or held[0].create_revision != fence.revision:
                log.warning("fenced write rejected: %s (rev %d) is not ours", *_fence(fence))
                if self.on_fence_lost is not None:
                    self.on_fence_lost(fence)
                raise FenceLost("leadership was lost; nothing was written")
        self.conflicts += 1
        if self.on_conflict is not None:
            self.on_conflict()
        return 0

    async def update(
        self,
        fn: Callable[[Txn], Awaitable[T]],
        *,
        fence: Fence | None,
        subject: str = "the records",
        retry: Retry = CONFLICT_RETRY,
    ) -> Updated[T]:
        """The one read-modify-write (k8s GuaranteedUpdate, etcd's STM): `fn` reads through
        the `Txn` it is given and buffers its writes there; they are committed in one
        transaction that requires every key read unchanged (and the fence). On a conflict
        `fn` runs again on a fresh `Txn`, so it must decide from what it reads and have no
        other effect; what it raises aborts with nothing written. Busy after
        `retry.attempts` conflicts, naming `subject` (what is being updated)."""
        for attempt in range(retry.attempts):
            if attempt:
                await retry.pause(attempt - 1)
            txn = Txn(self)
            result = await fn(txn)
            if not txn.writes:
                return Updated(result, 0)
            revision = await self.commit(txn.compares, txn.puts, list(txn.deletes), fence=fence)
            if revision:
                return Updated(result, revision)
        raise Busy(f"{subject} kept changing under {retry.attempts} attempts to update it; retry")

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """An unconditional put (the election's own key); prefer `commit` elsewhere."""
        resp = await self.etcd.put(
            rpc.PutRequest(key=key.encode(), value=value, lease=lease), timeout_s=self._timeout
        )
        return int(resp.header.revision)

    async def delete(self, key: str) -> int:
        resp = await self.etcd.delete_range(
            rpc.DeleteRangeRequest(key=key.encode()), timeout_s=self._timeout
        )
        return int(resp.header.revision)

    async def compact(self, revision: int) -> None:
        await self.etcd.compact(
            rpc.CompactionRequest(revision=revision, physical=True), timeout_s=30.0
        )

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl_s: float) -> int:
        resp = await self.etcd.lease_grant(
            rpc.LeaseGrantRequest(TTL=round(ttl_s)), timeout_s=self._timeout
        )
        if resp.error:
            raise Unavailable(f"etcd refused a lease: {resp.error}")
        return int(resp.ID)

    async def keepalive(self, lease_id: int, timeout_s: float | None = None) -> int:
        """Renew once; the remaining TTL in seconds, 0 when etcd no longer has the lease."""
        return await self.etcd.keepalive(lease_id, timeout_s=timeout_s or self._timeout)

    async def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(Unavailable):
            await self.etcd.lease_revoke(
                rpc.LeaseRevokeRequest(ID=lease_id), timeout_s=self._timeout
            )

    # ------------------------------------------------------------------ watch

    async def watch(self, prefix: str, start_revision: int) -> WatchStream:
        """Watch every key under `prefix` from `start_revision` (inclusive)."""
        return await self.etcd.watch(
            prefix.encode(), _range_end(prefix), start_revision, timeout_s=self._timeout
        )


def _fence(f: Fence) -> tuple[str, int]:
    return f.key, f.revision
