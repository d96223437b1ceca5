"""Store against a real etcd: reads, read-modify-write, fenced and optimistic commits, leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hvplace.coordinator.store import Compacted, Compare, Fence, FenceLost, Store
from hvplace.proto.errors import Busy, Unavailable
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


async def test_update_reruns_the_function_on_conflict(store: Store) -> None:
    await store.put(K + "n", b"0")
    calls = 0

    def bump(old: bytes | None) -> bytes:
        nonlocal calls
        calls += 1
        return str(int(old or b"0") + 1).encode()

    async def meddle() -> None:
        await store.put(K + "n", b"10")

    # A concurrent writer changes the key between the first read and its commit.
    real_get = store.get
    first = True

    async def racing_get(key: str):  # type: ignore[no-untyped-def]
        nonlocal first
        kv = await real_get(key)
        if first:
            first = False
            await meddle()
        return kv

    store.get = racing_get  # type: ignore[method-assign]
    assert await store.update(K + "n", bump, fence=None) == b"11"
    assert calls == 2
    store.get = real_get  # type: ignore[method-assign]
    # None deletes; an unchanged value writes nothing.
    assert await store.update(K + "n", lambda old: old, fence=None) == b"11"
    assert await store.update(K + "n", lambda old: None, fence=None) is None
    assert await store.get(K + "n") is None


async def test_update_gives_up_busy(store: Store) -> None:
    async def racing_get(key: str):  # type: ignore[no-untyped-def]
        kv = await Store.get(store, key)
        await store.put(key, b"other")
        return kv

    store.get = racing_get  # type: ignore[method-assign]
    with pytest.raises(Busy):
        await store.update(K + "hot", lambda old: b"mine", fence=None, retries=3)


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
