"""Helpers for the coordinator core tests: records and a running store + cache."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
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


@asynccontextmanager
async def renewing(store: Store, lease: int, every_s: float = 0.3) -> AsyncIterator[None]:
    """A live agent: `lease` renewed until the block ends; then the agent is dead, nothing
    renews it and etcd expires it after its TTL."""

    async def renew() -> None:
        while True:
            await store.keepalive(lease)
            await asyncio.sleep(every_s)

    task = asyncio.create_task(renew())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


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
