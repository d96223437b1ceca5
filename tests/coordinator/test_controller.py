"""The controller against a real etcd: pending VMs placed when a host registers, retried when
capacity returns; a host whose lease expires goes lost and its VMs are re-placed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from coord_support import host, register, renewing, running, vm
from hvplace.coordinator.cache import Cache
from hvplace.coordinator.controller import Controller
from hvplace.coordinator.daemon import api_core
from hvplace.coordinator.planner import Planner
from hvplace.coordinator.store import Store
from hvplace.proto import codec, keyspace
from hvplace.proto.records import ClusterConfig, HAPriority, HostState, Phase
from support.etcd import EtcdServer
from support.wait import eventually

FAST = ClusterConfig(lease_ttl_s=2, fence_after_s=1, failover_delay_s=0.5)


@asynccontextmanager
async def controlling(etcd: EtcdServer) -> AsyncIterator[tuple[Store, Cache, Controller]]:
    async with running(etcd) as (store, cache):
        planner = Planner(store, cache)
        ctl = Controller(store, cache, planner, cluster_default=FAST, resync_s=30)
        task = asyncio.create_task(ctl.run(None))  # type: ignore[arg-type]
        try:
            yield store, cache, ctl
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


async def put_vm(store: Store, name: str, memory_mib: int = 1024) -> None:
    await store.put(keyspace.vm("acme", name), codec.dumps(vm(name, memory_mib=memory_mib)))


async def test_writes_cluster_config_and_places_when_a_host_registers(etcd: EtcdServer) -> None:
    async with controlling(etcd) as (store, cache, _ctl):
        await eventually(lambda: cache.config is not None)
        assert cache.config == FAST
        await put_vm(store, "a")
        # No host yet: pending with a reason.
        await eventually(lambda: "acme/a" in cache.vm_status.records)
        st = cache.vm_status.records["acme/a"]
        assert st.phase is Phase.PENDING and st.explanation is not None
        await register(store, host("hv1"))
        await eventually(lambda: "acme/a" in cache.assignments.records)
        assert cache.vm_status.records["acme/a"].phase is Phase.SCHEDULED


async def test_pending_placed_when_capacity_returns(etcd: EtcdServer) -> None:
    async with controlling(etcd) as (store, cache, _ctl):
        await register(store, host("hv1", memory_mib=2048))
        await put_vm(store, "a", 2048)
        await eventually(lambda: "acme/a" in cache.assignments.records)
        await put_vm(store, "b", 2048)
        await eventually(lambda: "acme/b" in cache.vm_status.records)
        assert "memory" in cache.vm_status.records["acme/b"].reason
        # a is deleted (as the API does): b fits now.
        a_key = cache.assignment_key("acme/a")
        assert a_key is not None
        await store.commit([], {}, [keyspace.vm("acme", "a"), a_key[0]], fence=None)
        await eventually(lambda: "acme/b" in cache.assignments.records)


async def test_lost_host_vms_replaced_after_failover_delay(etcd: EtcdServer) -> None:
    async with controlling(etcd) as (store, cache, ctl):
        lease1 = await register(store, host("hv1", memory_mib=2048), ttl=2)
        async with renewing(store, lease1):
            await put_vm(store, "a", 2048)
            await eventually(lambda: "acme/a" in cache.assignments.records)
            assert cache.assignments.records["acme/a"].host == "hv1"
            await register(store, host("hv2", memory_mib=2048))
        # hv1's agent is dead: nothing renews its lease; etcd expires it after 2 s.
        await eventually(lambda: "hv1" in cache.host_status.records, 10)
        status = cache.host_status.records["hv1"]
        assert status.state is HostState.LOST
        await eventually(lambda: cache.assignments.records["acme/a"].host == "hv2", 10)
        a = cache.assignments.records["acme/a"]
        assert a.epoch == 2
        replaced = cache.vm_status.records["acme/a"]
        assert replaced.phase is Phase.SCHEDULED
        # Re-placed no sooner than failover_delay after the loss was recorded.
        assert replaced.since >= status.since + FAST.failover_delay_s - 0.05
        await eventually(lambda: ctl.failovers == 1)  # the cache may see the commit first


async def test_lost_host_vm_pending_until_capacity_returns(etcd: EtcdServer) -> None:
    async with controlling(etcd) as (store, cache, _ctl):
        lease = await register(store, host("hv1", memory_mib=2048), ttl=2)
        async with renewing(store, lease):
            await put_vm(store, "a", 2048)
            await eventually(lambda: "acme/a" in cache.assignments.records)
        # hv1's agent is dead: nothing renews its lease; etcd expires it after 2 s.
        await eventually(lambda: cache.vm_status.records["acme/a"].phase is Phase.PENDING, 10)
        assert "acme/a" not in cache.assignments.records  # taken back: nowhere to go
        await register(store, host("hv2", memory_mib=4096))
        await eventually(lambda: "acme/a" in cache.assignments.records, 10)
        assert cache.assignments.records["acme/a"].host == "hv2"
        assert cache.vm_status.records["acme/a"].phase is Phase.SCHEDULED


async def _gone(store: Store, key: str) -> None:
    async with asyncio.timeout(10):
        while await store.get(key) is not None:  # noqa: ASYNC110 - etcd's state, no event
            await asyncio.sleep(0.1)


async def test_a_coordinator_started_after_a_host_died_declares_it_lost(etcd: EtcdServer) -> None:
    """Issue 9 case 3: the whole control plane down while a host dies, then one
    coordinator starts. It never saw the host's key deleted, yet derives `lost` from
    the records (an assignment names the host, no registration) one lease TTL after
    taking office, and re-places the VMs."""
    async with controlling(etcd) as (store, cache, _ctl):
        await register(store, host("hv1", memory_mib=2048), ttl=2)
        await put_vm(store, "a", 2048)
        await eventually(lambda: "acme/a" in cache.assignments.records)
    # No coordinator runs: hv1's agent dies, its lease expires unseen.
    async with running(etcd) as (store, _cache):
        await _gone(store, keyspace.host("hv1"))
        await register(store, host("hv2", memory_mib=2048))
    async with controlling(etcd) as (store, cache, ctl):
        office = time.time()
        # Before it declares hv1 lost, `host list` shows it (an assignment names it).
        ops = api_core(store, cache).operations
        listed = {h.info.name: h for h in await ops.hosts.list()}
        assert listed["hv1"].status is not None and not listed["hv1"].alive
        assert listed["hv1"].status.state is HostState.LOST
        assert listed["hv1"].vms == ("acme/a",)
        await eventually(lambda: cache.assignments.records["acme/a"].host == "hv2", 15)
        status = cache.host_status.records["hv1"]
        assert status.state is HostState.LOST
        # Not before one lease TTL from taking office: it cannot know when the key went.
        assert status.since >= office + FAST.lease_ttl_s - 0.1
        assert cache.vm_status.records["acme/a"].phase is Phase.SCHEDULED
        await eventually(lambda: ctl.failovers == 1)  # the cache may see the commit first


async def test_failover_leaving_a_vm_pending_takes_its_assignment_back(etcd: EtcdServer) -> None:
    """Issue 9 case 6: a VM that failover cannot place is pending AND unassigned, so a
    returning agent finds no assignment to start; the VM is placed again with a newer
    epoch (here on the returning host) and the status says so."""
    async with controlling(etcd) as (store, cache, _ctl):
        await register(store, host("hv1", memory_mib=2048), ttl=2)
        await put_vm(store, "a", 2048)
        await eventually(lambda: "acme/a" in cache.assignments.records)
        assert cache.assignments.records["acme/a"].epoch == 1
        await eventually(lambda: cache.vm_status.records["acme/a"].phase is Phase.PENDING, 10)
        assert "acme/a" not in cache.assignments.records
        left = [kv async for kvs, _rev in store.list_pages(keyspace.ASSIGNMENTS) for kv in kvs]
        assert left == []  # nothing left in etcd for a returning agent to act on
        pending = cache.vm_status.records["acme/a"]
        assert pending.host == "" and pending.reason
        await register(store, host("hv1", memory_mib=2048))  # the host comes back
        await eventually(lambda: "acme/a" in cache.assignments.records, 10)
        again = cache.assignments.records["acme/a"]
        assert again.host == "hv1" and again.epoch == 2
        assert cache.vm_status.records["acme/a"].phase is Phase.SCHEDULED


async def test_an_ha_off_vm_waits_for_its_host_and_is_scheduled_when_it_returns(
    etcd: EtcdServer,
) -> None:
    """HA `off`: never restarted elsewhere. Its assignment stays with its lost host (the
    one host allowed to run it), and when that host is back the API says scheduled."""
    async with controlling(etcd) as (store, cache, _ctl):
        await register(store, host("hv1"), ttl=2)
        spec = dataclasses.replace(vm("solo"), ha_priority=HAPriority.OFF)
        await store.put(keyspace.vm("acme", "solo"), codec.dumps(spec))
        await eventually(lambda: "acme/solo" in cache.assignments.records)
        await register(store, host("hv2"))  # room elsewhere, which HA off must not use
        await eventually(lambda: cache.vm_status.records["acme/solo"].phase is Phase.PENDING, 10)
        assert cache.assignments.records["acme/solo"].host == "hv1"  # kept: HA off
        assert "HA priority off" in cache.vm_status.records["acme/solo"].reason
        await register(store, host("hv1"))
        await eventually(lambda: cache.vm_status.records["acme/solo"].phase is Phase.SCHEDULED, 10)
        status = cache.vm_status.records["acme/solo"]
        assert status.host == "hv1" and status.epoch == 1
