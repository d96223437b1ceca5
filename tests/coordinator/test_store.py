"""Store against a real etcd: reads, read-modify-write, fenced and optimistic commits, leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import hvplace.runtime.etcd
import pytest
from hvplace.coordinator.store import (
    Compacted,
    Compare,
    Fence,
    FenceLost,
    Retry,
    Store,
    Txn,
    Updated,
)
from hvplace.proto.errors import Busy, Conflict, Unavailable
from hvplace.runtime.etcd import TooLarge
from support.etcd import EtcdServer

K = "/hvplace/v1/test/"


@pytest.fixture
async def store(etcd: EtcdServer) -> AsyncIterator[Store]:
    s = await Store.connect([etcd.endpoint], timeout=5)
    try:
        yield s
    finally:
        await s.close()


async def test_get_list_and_revisions(store: Store) -> None:
    assert await store.get(K + "a") is None
    rev = await store.commit([Compare.absent(K + "a")], {K + "a": b"1", K + "b": b"2"}, fence=None)
    assert rev > 0
    kv = await store.get(K + "a")
    assert kv is not None and kv.value == b"1" and kv.mod_revision == rev == kv.create_revision
    kvs, at = await store.list_prefix(K)
    assert [k.key for k in kvs] == [K + "a", K + "b"] and at >= rev
    # A second create of the same key fails its compare and writes nothing.
    assert await store.commit([Compare.absent(K + "a")], {K + "a": b"x"}, fence=None) == 0
    assert store.conflicts == 1
    assert (await store.get(K + "a")).value == b"1"  # type: ignore[union-attr]


async def test_list_pages_reads_one_revision(store: Store) -> None:
    puts = {f"{K}{i:04d}": b"v" for i in range(25)}
    await store.commit([], puts, fence=None)
    pages = [p async for p in store.list_pages(K, page=10)]
    assert [len(kvs) for kvs, _ in pages] == [10, 10, 5]
    assert len({rev for _, rev in pages}) == 1


async def test_list_prefixes_reads_each_in_turn_at_one_revision_pages_by_bytes(
    store: Store,
) -> None:
    """Prefixes in the order asked, at the revision of the first request (a write made
    meanwhile is not seen), the pages growing to a size in bytes by their keys' sizes."""
    value = b"v" * 100
    a = {f"{K}a/{i:04d}": value for i in range(30)}
    b = {f"{K}b/{i:04d}": value for i in range(5)}
    await store.commit([], {**a, **b}, fence=None)
    seen: list[tuple[str, list[str], int]] = []
    async for prefix, kvs, at in store.list_prefixes(
        [K + "a/", K + "c/", K + "b/"], page=4, page_bytes=1200
    ):
        if not seen:
            await store.put(K + "b/late", b"x")  # after the revision the listing reads
        seen.append((prefix, [kv.key.decode() for kv in kvs], at))
    assert [kv for p, keys, _ in seen if p == K + "a/" for kv in keys] == sorted(a)
    assert [kv for p, keys, _ in seen if p == K + "b/" for kv in keys] == sorted(b)
    assert [p for p, _, _ in seen] == [K + "a/"] * 4 + [K + "c/", K + "b/"]
    # 4 keys first, then twice as many, then about 1200 bytes' worth of 123-byte keys (9);
    # the next prefixes start at 9.
    assert [len(keys) for _, keys, _ in seen] == [4, 8, 9, 9, 0, 5]
    assert len({at for _, _, at in seen}) == 1


async def test_list_pages_asks_for_fewer_keys_when_a_page_is_too_large(
    store: Store, etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer over the client's message cap (RESOURCE_EXHAUSTED) is asked again for a
    quarter as many keys; a single key over the cap is an error, not a loop."""
    small = {f"{K}a{i:02d}": b"s" for i in range(8)}
    big = {f"{K}b{i:02d}": b"B" * 20_000 for i in range(8)}
    await store.commit([], {**small, **big}, fence=None)
    monkeypatch.setattr(hvplace.runtime.etcd, "_MAX_MESSAGE", 64 * 1024)
    capped = await Store.connect([etcd.endpoint], timeout=5)  # takes 64 kB answers at most
    try:
        pages = [[kv.key.decode() for kv in kvs] async for kvs, _ in capped.list_pages(K, page=16)]
        assert [key for keys in pages for key in keys] == sorted({**small, **big})
        # 16 keys were too large (8 of 20 kB), so 4; 4 of the large ones too, so 1.
        assert [len(keys) for keys in pages] == [4, 4] + [1] * 8
        await store.put(K + "huge", b"H" * 70_000)
        with pytest.raises(TooLarge):
            async for _ in capped.list_pages(K + "huge"):
                pass
    finally:
        await capped.close()


async def test_update_reruns_the_function_on_conflict(store: Store) -> None:
    await store.put(K + "n", b"0")
    calls = 0

    async def bump(txn: Txn) -> bytes:
        nonlocal calls
        calls += 1
        new = str(int(await txn.get(K + "n") or b"0") + 1).encode()
        if calls == 1:
            # A concurrent writer changes the key between this read and the commit.
            await store.put(K + "n", b"10")
        txn.put(K + "n", new)
        return new

    done = await store.update(bump, fence=None)
    assert (done.result, calls) == (b"11", 2)
    kv = await store.get(K + "n")
    assert kv is not None and kv.value == b"11" and kv.mod_revision == done.revision

    async def read_only(txn: Txn) -> bytes | None:
        return await txn.get(K + "n")

    # Nothing written: no commit, revision 0.
    assert await store.update(read_only, fence=None) == Updated(b"11", 0)

    async def remove(txn: Txn) -> None:
        await txn.get(K + "n")
        txn.delete(K + "n")

    assert (await store.update(remove, fence=None)).revision > done.revision
    assert await store.get(K + "n") is None


async def test_update_of_several_keys_compares_every_key_read(store: Store) -> None:
    """A key read as absent must still be absent: a create racing another create of the
    same key re-runs and sees it, and the function decides again (here: refuses)."""
    attempts = 0

    async def create(txn: Txn) -> None:
        nonlocal attempts
        attempts += 1
        if await txn.get(K + "a") is not None:
            raise Conflict("a exists")
        txn.require_absent(K + "b")
        if attempts == 1:
            await store.put(K + "a", b"theirs")
        txn.put(K + "a", b"mine")
        txn.put(K + "b", b"mine")

    with pytest.raises(Conflict):
        await store.update(create, fence=None)
    assert attempts == 2
    a = await store.get(K + "a")
    assert a is not None and a.value == b"theirs" and await store.get(K + "b") is None


async def test_update_gives_up_busy(store: Store) -> None:
    calls = 0

    async def contended(txn: Txn) -> None:
        nonlocal calls
        calls += 1
        await txn.get(K + "hot")
        await store.put(K + "hot", b"other")  # someone else always writes first
        txn.put(K + "hot", b"mine")

    with pytest.raises(Busy, match="the hot key kept changing under 3 attempts"):
        await store.update(
            contended, fence=None, subject="the hot key", retry=Retry(attempts=3, backoff_s=0)
        )
    assert calls == 3
    kv = await store.get(K + "hot")
    assert kv is not None and kv.value == b"other"


async def test_fence_rejects_a_stale_token(store: Store) -> None:
    lease = await store.grant(5)
    leader = K + "election/a"
    rev = await store.put(leader, b"me", lease=lease)
    fence = Fence(leader, rev)
    assert await store.commit([], {K + "x": b"1"}, fence=fence)
    lost: list[Fence] = []
    store.on_fence_lost = lost.append
    # The lease goes (the leader was deposed); a new key takes the same name.
    await store.revoke(lease)
    await store.put(leader, b"someone else")
    with pytest.raises(FenceLost):
        await store.commit([], {K + "x": b"2"}, fence=fence)
    assert lost == [fence]

    async def overwrite(txn: Txn) -> None:
        await txn.get(K + "x")
        txn.put(K + "x", b"3")

    # The read-modify-write is fenced too: no retry, nothing written.
    with pytest.raises(FenceLost):
        await store.update(overwrite, fence=fence)
    assert lost == [fence, fence]
    assert (await store.get(K + "x")).value == b"1"  # type: ignore[union-attr]
    # An ordinary compare failure under a valid fence is a conflict, not a lost fence.
    fence2 = Fence(leader, (await store.get(leader)).create_revision)  # type: ignore[union-attr]
    assert await store.commit([Compare.absent(K + "x")], {K + "x": b"3"}, fence=fence2) == 0


async def test_prefix_compare(store: Store) -> None:
    rev = await store.put(K + "p/a", b"1")
    assert await store.commit(
        [Compare.prefix_unchanged_since(K + "p/", rev)], {K + "q": b"1"}, fence=None
    )
    await store.put(K + "p/b", b"1")
    assert not await store.commit(
        [Compare.prefix_unchanged_since(K + "p/", rev)], {K + "q": b"2"}, fence=None
    )


async def test_lease_keepalive_and_expiry(store: Store) -> None:
    lease = await store.grant(2)
    await store.put(K + "leased", b"1", lease=lease)
    assert await store.keepalive(lease) > 0
    await store.revoke(lease)
    assert await store.get(K + "leased") is None
    assert await store.keepalive(lease) == 0


async def test_watch_and_compaction(store: Store) -> None:
    start = await store.put(K + "w", b"1")
    stream = await store.watch(K, start)
    await store.put(K + "w", b"2")
    await store.delete(K + "w")
    seen = []
    async with asyncio.timeout(5):
        async for batch in stream:
            seen.extend((e.type, e.value) for e in batch.events)
            if len(seen) >= 3:
                break
    await stream.close()
    assert seen == [("put", b"1"), ("put", b"2"), ("delete", b"")]
    now = await store.put(K + "w", b"3")
    await store.compact(now)
    with pytest.raises(Compacted):
        s = await store.watch(K, start)
        async with asyncio.timeout(5):
            async for _ in s:
                pass


async def test_unreachable_etcd_is_unavailable() -> None:
    from support.etcd import free_port

    s = await Store.connect([f"127.0.0.1:{free_port()}"], timeout=0.5)
    with pytest.raises(Unavailable):
        await s.get("/hvplace/v1/x")
    await s.close()
