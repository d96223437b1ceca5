"""The coordinator's store and leadership on a 3-member etcd: the member in use dies."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from hvplace.coordinator.cache import Cache
from hvplace.coordinator.election import Election
from hvplace.coordinator.store import Fence, Store
from hvplace.proto import keyspace
from hvplace.proto.errors import Unavailable
from support.etcd import EtcdCluster, members_connected_from
from support.wait import eventually

K = keyspace.ROOT + "test/"


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_the_leader_keeps_its_term_when_its_member_dies(
    role: str, etcd_cluster: EtcdCluster
) -> None:
    """kill -9 of the etcd member the leading coordinator uses (raft's leader or a
    follower; endpoints by DNS name): its session is renewed through another member, so
    it stays leader with the same fencing token past the session TTL, its fenced writes
    go through, and its cache's watch resumes there and sees them."""
    leader = etcd_cluster.leader()
    members = sorted(etcd_cluster.members, key=lambda m: (m is leader) == (role == "follower"))
    store = await Store.connect([f"localhost:{m.client_port}" for m in members], timeout=2)
    cache = Cache(store)
    await cache.start()
    terms: list[Fence] = []

    async def work(fence: Fence) -> None:
        terms.append(fence)
        await asyncio.Event().wait()

    ttl = 3.0
    election = Election(store, "c1", ttl, work)
    task = asyncio.create_task(election.run())
    try:
        await eventually(lambda: election.is_leader)
        fence = election.require_fence()
        in_use = members_connected_from(etcd_cluster)
        assert in_use == [members[0]], "the store talks to its first endpoint only"
        killed = time.monotonic()
        members[0].kill()
        revision = 0
        while not revision and time.monotonic() - killed < 10:
            # During an election every member refuses; the controller retries the same way.
            with contextlib.suppress(Unavailable):
                revision = await store.commit([], {K + "after": b"1"}, fence=fence)
        assert revision
        await cache.wait_for_revision(revision, 10)
        while time.monotonic() - killed < 2 * ttl:
            assert election.is_leader and election.require_fence() == fence
            await asyncio.sleep(0.1)
        assert terms == [fence]
        assert members[0] not in members_connected_from(etcd_cluster)
    finally:
        election.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cache.close()
        await store.close()
