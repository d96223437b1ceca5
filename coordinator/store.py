"""The coordinator's one seam to etcd: typed reads, fenced optimistic transactions, the
read-modify-write helper, leases and a resumable watch (over etcd's gRPC API via aetcd's stubs)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc
from hvplace.proto import keyspace
from hvplace.proto.errors import Busy, Interrupted, Unavailable
from hvplace.proto.etcd_channel import RECONNECT_OPTIONS

log = logging.getLogger(__name__)

UPDATE_RETRIES = 8
"""Read-modify-write attempts before `Busy` (k8s GuaranteedUpdate retries until it wins;
we bound it so a hot key answers `busy` instead of spinning)."""

LIST_PAGE = 5_000
"""Keys per range request when listing: keeps each response far below gRPC's message cap."""

_MAX_MESSAGE = 64 * 1024 * 1024


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


@dataclass(frozen=True, slots=True)
class Compare:
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


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # put | delete
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: `revision` is the highest revision the stream has shown
    (for a progress notification, etcd's revision with nothing missed below it)."""

    revision: int
    events: tuple[WatchEvent, ...]


class FenceLost(Interrupted):
    """A fenced commit was rejected because the fencing token is no longer the leader's."""


class Compacted(Exception):
    """The watch's start revision was compacted away; the caller must relist."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted the history up to revision {compact_revision}")
        self.compact_revision = compact_revision


def _target(endpoints: Sequence[str]) -> str:
    hosts = [e.removeprefix("http://").removeprefix("https://").rstrip("/") for e in endpoints]
    if not hosts:
        raise ValueError("no etcd endpoint given")
    if len(hosts) == 1:
        return hosts[0]
    # gRPC fails over between literal IPv4 addresses itself (pick_first over the list).
    try:
        for h in hosts:
            ipaddress.IPv4Address(h.rpartition(":")[0])
    except ValueError:
        log.warning("several etcd endpoints given by name; using %s only", hosts[0])
        return hosts[0]
    return "ipv4:" + ",".join(hosts)


def _kv(raw: Any) -> KV:
    return KV(
        key=raw.key.decode(),
        value=bytes(raw.value),
        create_revision=int(raw.create_revision),
        mod_revision=int(raw.mod_revision),
        lease=int(raw.lease),
    )


def _range_end(prefix: str) -> bytes:
    return keyspace.prefix_end(prefix).encode()


class Store:
    """etcd for the coordinator. Every unary call is bounded by `timeout`; etcd or network
    failures surface as `Unavailable`, compare failures as a falsy commit result."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout
        self._kv = rpc.KVStub(channel)
        self._lease = rpc.LeaseStub(channel)
        self._watch = rpc.WatchStub(channel)
        self.conflicts = 0
        self.on_conflict: Callable[[], None] | None = None
        self.on_fence_lost: Callable[[Fence], None] | None = None

    @classmethod
    async def connect(cls, endpoints: Sequence[str], *, timeout: float) -> Store:  # noqa: ASYNC109
        channel = grpc.aio.insecure_channel(
            _target(endpoints),
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                *RECONNECT_OPTIONS,
            ],
        )
        return cls(channel, timeout)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout_s or self._timeout)
        except grpc.aio.AioRpcError as e:
            raise Unavailable(f"etcd: {e.code().name} {e.details() or ''}".strip()) from None

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> KV | None:
        resp = await self._call(self._kv.Range, rpc.RangeRequest(key=key.encode()))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def revision(self) -> int:
        """etcd's current revision (a linearizable read)."""
        resp = await self._call(
            self._kv.Range, rpc.RangeRequest(key=keyspace.CONFIG.encode(), count_only=True)
        )
        return int(resp.header.revision)

    async def list_pages(
        self, prefix: str, *, keys_only: bool = False, page: int = LIST_PAGE
    ) -> AsyncIterator[tuple[list[Any], int]]:
        """Every key under `prefix` at one revision, a page at a time, as etcd's raw
        KeyValue messages (the cache decodes them without keeping a second copy)."""
        start, end, revision = prefix.encode(), _range_end(prefix), 0
        while True:
            req = rpc.RangeRequest(
                key=start, range_end=end, limit=page, revision=revision, keys_only=keys_only
            )
            resp = await self._call(self._kv.Range, req, timeout_s=max(self._timeout, 30.0))
            revision = revision or int(resp.header.revision)
            kvs = list(resp.kvs)
            yield kvs, revision
            if not resp.more or not kvs:
                return
            start = kvs[-1].key + b"\x00"

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
        resp = await self._call(self._kv.Range, req)
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
        resp = await self._call(self._kv.Range, req)
        return _kv(resp.kvs[0]) if resp.kvs else None

    # ------------------------------------------------------------------ writes

    def _compare(self, c: Compare) -> Any:
        if c.prefix:
            return rpc.Compare(
                key=c.key.encode(),
                range_end=_range_end(c.key),
                target=rpc.Compare.MOD,
                result=rpc.Compare.LESS,
                mod_revision=c.mod_revision + 1,
            )
        return rpc.Compare(
            key=c.key.encode(),
            target=rpc.Compare.MOD,
            result=rpc.Compare.EQUAL,
            mod_revision=c.mod_revision,
        )

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
        cmp = [self._compare(c) for c in compares]
        failure = []
        if fence is not None:
            cmp.append(
                rpc.Compare(
                    key=fence.key.encode(),
                    target=rpc.Compare.CREATE,
                    result=rpc.Compare.EQUAL,
                    create_revision=fence.revision,
                )
            )
            failure.append(rpc.RequestOp(request_range=rpc.RangeRequest(key=fence.key.encode())))
        ops = [
            rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=v, lease=lease))
            for k, v in puts.items()
        ]
        ops += [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k.encode()))
            for k in deletes
        ]
        req = rpc.TxnRequest(compare=cmp, success=ops, failure=failure)
        resp = await self._call(self._kv.Txn, req)
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
        key: str,
        fn: Callable[[bytes | None], bytes | None],
        *,
        fence: Fence | None,
        retries: int = UPDATE_RETRIES,
    ) -> bytes | None:
        """Read-modify-write of one key (k8s GuaranteedUpdate): `fn` gets the current value
        (None if absent) and returns the new one (None deletes). It must be pure: it is
        re-run on every conflict. Raises Busy after `retries` conflicts."""
        for _ in range(retries):
            current = await self.get(key)
            old = current.value if current is not None else None
            new = fn(old)
            if new == old:
                return new
            compare = Compare.unchanged(key, current.mod_revision if current else 0)
            if new is None:
                done = await self.commit([compare], {}, [key], fence=fence)
            else:
                done = await self.commit([compare], {key: new}, fence=fence)
            if done:
                return new
        raise Busy(f"{key} kept changing under {retries} attempts to update it; retry")

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """An unconditional put (the election's own key); prefer `commit` elsewhere."""
        resp = await self._call(
            self._kv.Put, rpc.PutRequest(key=key.encode(), value=value, lease=lease)
        )
        return int(resp.header.revision)

    async def delete(self, key: str) -> int:
        resp = await self._call(self._kv.DeleteRange, rpc.DeleteRangeRequest(key=key.encode()))
        return int(resp.header.revision)

    async def compact(self, revision: int) -> None:
        await self._call(
            self._kv.Compact, rpc.CompactionRequest(revision=revision, physical=True), 30.0
        )

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl_s: float) -> int:
        resp = await self._call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=round(ttl_s)))
        if resp.error:
            raise Unavailable(f"etcd refused a lease: {resp.error}")
        return int(resp.ID)

    async def keepalive(self, lease_id: int, timeout_s: float | None = None) -> int:
        """Renew once; the remaining TTL in seconds, 0 when etcd no longer has the lease."""
        try:
            call = self._lease.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=timeout_s or self._timeout
            )
            async for reply in call:
                return int(reply.TTL)
        except grpc.aio.AioRpcError as e:
            raise Unavailable(f"etcd lease renewal: {e.code().name} {e.details()}") from None
        return 0

    async def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(Unavailable):
            await self._call(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id))

    # ------------------------------------------------------------------ watch

    async def watch(self, prefix: str, start_revision: int) -> WatchStream:
        """Watch every key under `prefix` from `start_revision` (inclusive)."""
        stream = WatchStream(self._watch, prefix, start_revision)
        await stream.start(self._timeout)
        return stream


def _fence(f: Fence) -> tuple[str, int]:
    return f.key, f.revision


class WatchStream:
    """One etcd watch; iterate for WatchBatch. Raises Compacted when the history is gone,
    Unavailable when the stream breaks; `request_progress()` asks etcd for the current
    revision so an idle watcher can prove it is caught up."""

    def __init__(self, stub: Any, prefix: str, start_revision: int) -> None:
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._stub = stub
        self._prefix = prefix
        self._start = start_revision
        self._call: Any = None
        self._responses: AsyncIterator[Any] | None = None

    async def _request_iter(self) -> AsyncIterator[Any]:
        while True:
            req = await self._requests.get()
            if req is None:
                return
            yield req

    async def start(self, timeout_s: float) -> None:
        create = rpc.WatchCreateRequest(
            key=self._prefix.encode(),
            range_end=_range_end(self._prefix),
            start_revision=self._start,
            progress_notify=True,
        )
        self._requests.put_nowait(rpc.WatchRequest(create_request=create))
        self._call = self._stub.Watch(self._request_iter())
        self._responses = self._call.__aiter__()
        first = await asyncio.wait_for(self._next(), timeout_s)
        if first.compact_revision:
            await self.close()
            raise Compacted(int(first.compact_revision))
        if not first.created:
            await self.close()
            raise Unavailable("etcd did not create the watch")

    async def _next(self) -> Any:
        assert self._responses is not None
        try:
            return await self._responses.__anext__()
        except StopAsyncIteration:
            raise Unavailable("etcd closed the watch stream") from None
        except grpc.aio.AioRpcError as e:
            raise Unavailable(f"etcd watch: {e.code().name} {e.details() or ''}") from None

    def request_progress(self) -> None:
        self._requests.put_nowait(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> WatchBatch:
        resp = await self._next()
        if resp.compact_revision:
            raise Compacted(int(resp.compact_revision))
        if resp.canceled:
            raise Unavailable(f"etcd canceled the watch: {resp.cancel_reason}")
        events = tuple(
            WatchEvent(
                type="delete" if e.type == rpc.Event.DELETE else "put",
                key=e.kv.key.decode(),
                value=e.kv.value,
                mod_revision=int(e.kv.mod_revision),
            )
            for e in resp.events
        )
        revision = events[-1].mod_revision if events else int(resp.header.revision)
        return WatchBatch(revision=revision, events=events)

    async def close(self) -> None:
        self._requests.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
