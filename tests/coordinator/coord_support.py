"""Helpers for the coordinator core tests: records and a running store + cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from hvplace.coordinator.cache import Cache
from hvplace.coordinator.store import Store
from hvplace.proto import codec, keyspace
from hvplace.proto.records import VM, HostInfo, Resources
from support.etcd import EtcdServer


def host(name: str, vcpus: int = 8, memory_mib: int = 8192, **labels: str) -> HostInfo:
    return HostInfo(name=name, labels=labels, capacity=Resources(vcpus, memory_mib, 100))


def vm(name: str, scope: str = "acme", memory_mib: int = 1024, **labels: str) -> VM:
    return VM(scope=scope, name=name, labels=labels, resources=Resources(1, memory_mib, 0))


async def register(store: Store, info: HostInfo, ttl: float = 30) -> int:
    """Register a host as its agent would: HostInfo on a lease; returns the lease."""
    lease = await store.grant(ttl)
    await store.put(keyspace.host(info.name), codec.dumps(info), lease=lease)
    return lease


async def until(predicate: Callable[[], bool], timeout_s: float = 10) -> None:
    """Poll `predicate` until true (state that moves through etcd and a watch)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the state has no event of its own
            await asyncio.sleep(0.05)


@asynccontextmanager
async def running(etcd: EtcdServer) -> AsyncIterator[tuple[Store, Cache]]:
    store = await Store.connect([etcd.endpoint], timeout=5)
    cache = Cache(store)
    await cache.start()
    try:
        yield store, cache
    finally:
        await cache.close()
        await store.close()
