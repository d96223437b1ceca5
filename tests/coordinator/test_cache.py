"""The list + watch cache against a real etcd: typed tables, resume, relist after compaction."""

from __future__ import annotations

import asyncio

from coord_support import host, register, running, vm
from hvplace.coordinator.cache import ASSIGNMENTS, HOSTS, RESYNC, Change
from hvplace.proto import codec, keyspace, records
from hvplace.proto.records import Assignment, HostState, HostStatus, Rule, RuleKind
from support.etcd import EtcdServer
from support.wait import eventually


async def test_list_then_watch_typed_records(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        pre = vm("pre")
        await store.put(keyspace.vm("acme", "pre"), codec.dumps(pre))
        await cache.fresh()
        assert cache.vms.records["acme/pre"] == pre
    async with running(etcd) as (store, cache):
        # Listed at start.
        assert cache.vms.records["acme/pre"] == pre
        changes: list[Change] = []
        cache.add_listener(changes.append)
        await register(store, host("hv1"))
        a = Assignment(vm=pre, host="hv1", epoch=1)
        rev = await store.put(keyspace.assignment("hv1", "acme", "pre"), codec.dumps(a))
        await store.put(
            keyspace.rule("acme", "r"),
            codec.dumps(
                Rule(scope="acme", name="r", kind=RuleKind.ANTI_AFFINITY, members=("a", "b"))
            ),
        )
        await store.put(keyspace.CONFIG + "x", b"ignored")  # an unknown key is harmless
        await cache.fresh()
        assert cache.revision >= rev
        assert cache.hosts.records["hv1"].name == "hv1"
        assert cache.assignments.records["acme/pre"].host == "hv1"
        # The assignment shares the spec's VM object (memory).
        assert cache.assignments.records["acme/pre"].vm is cache.vms.records["acme/pre"]
        assert cache.assignments.revs["acme/pre"] == rev
        assert "acme/r" in cache.rules.records
        assert [c.kind for c in changes][:2] == [HOSTS, ASSIGNMENTS]
        snap = cache.snapshot()
        assert (
            dict(snap.placements) == {"acme/pre": "hv1"}
            and snap.hosts["hv1"].state is HostState.READY
        )


async def test_deleted_assignment_and_domain_leave_the_cache(etcd: EtcdServer) -> None:
    """A deleted assignment must not linger: it would hold capacity, count against rules
    and make every later compare on it fail (a re-created VM of the same name)."""
    async with running(etcd) as (store, cache):
        spec = vm("gone")
        await register(store, host("hv1"))
        await store.put(keyspace.vm("acme", "gone"), codec.dumps(spec))
        a = Assignment(vm=spec, host="hv1", epoch=1)
        await store.put(keyspace.assignment("hv1", "acme", "gone"), codec.dumps(a))
        d = records.DomainStatus(scope="acme", name="gone", host="hv1", epoch=1)
        await store.put(keyspace.domain("hv1", "acme", "gone"), codec.dumps(d))
        await cache.fresh()
        assert dict(cache.snapshot().placements) == {"acme/gone": "hv1"}
        assert "acme/gone" in cache.domains.records
        await store.delete(keyspace.assignment("hv1", "acme", "gone"))
        await store.delete(keyspace.domain("hv1", "acme", "gone"))
        await cache.fresh()
        assert "acme/gone" not in cache.assignments.records
        assert "acme/gone" not in cache.domains.records
        assert dict(cache.snapshot().placements) == {}


async def test_departed_host_is_lost_in_snapshot(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        lease = await register(store, host("hv1"))
        await cache.fresh()
        await store.revoke(lease)
        await cache.fresh()
        assert "hv1" not in cache.hosts.records
        assert cache.snapshot().hosts["hv1"].state is HostState.LOST
        await store.put(keyspace.host_status("hv1"), codec.dumps(HostStatus("hv1", HostState.LOST)))
        await register(store, host("hv1"))
        await cache.fresh()
        assert "hv1" not in cache.departed


async def test_wait_for_revision_when_only_other_keys_changed(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        rev = await store.put("/elsewhere/key", b"1")
        # No event under /hvplace/v1/ carries this revision: a progress notify must.
        await asyncio.wait_for(cache.wait_for_revision(rev), 5)
        assert cache.revision >= rev
        await store.delete("/elsewhere/key")


async def test_resumes_after_etcd_restart(own_etcd: EtcdServer) -> None:
    async with running(own_etcd) as (store, cache):
        await store.put(keyspace.vm("acme", "a"), codec.dumps(vm("a")))
        await cache.fresh()
        own_etcd.kill()
        own_etcd.start()
        await store.put(keyspace.vm("acme", "b"), codec.dumps(vm("b")))
        await eventually(lambda: "acme/b" in cache.vms.records, 15)
        assert cache.relists == 1  # resumed from its revision, no relist


async def test_relists_after_compaction(own_etcd: EtcdServer) -> None:
    async with running(own_etcd) as (store, cache):
        resyncs: list[Change] = []
        cache.add_listener(lambda c: resyncs.append(c) if c.type == RESYNC else None)
        await store.put(keyspace.vm("acme", "a"), codec.dumps(vm("a")))
        await cache.fresh()
        # Stop following (as if partitioned), change things, compact past our revision.
        await cache.close()
        await store.put(keyspace.vm("acme", "b"), codec.dumps(vm("b")))
        await store.delete(keyspace.vm("acme", "a"))
        now = await store.put(keyspace.vm("acme", "c"), codec.dumps(vm("c")))
        await store.compact(now)
        task = asyncio.create_task(cache._follow())
        cache._task = task
        await eventually(lambda: cache.relists >= 2)
        assert set(cache.vms.records) == {"acme/b", "acme/c"}
        assert cache.revision >= now
        assert resyncs and resyncs[0].kind == RESYNC


async def test_expected_writes_are_taken_as_written_and_only_when_the_bytes_match(
    etcd: EtcdServer,
) -> None:
    async with running(etcd) as (store, cache):
        mine, theirs = vm("mine"), vm("theirs")
        key_mine, key_theirs = keyspace.vm("acme", "mine"), keyspace.vm("acme", "theirs")
        cache.expect(
            {
                key_mine: (codec.dumps(mine), mine),
                # Expected, but someone else's bytes land first: decoded, not trusted.
                key_theirs: (codec.dumps(theirs), theirs),
            }
        )
        await store.put(key_mine, codec.dumps(mine))
        other = vm("theirs", memory_mib=2048)
        await store.put(key_theirs, codec.dumps(other))
        await cache.fresh()
        assert cache.vms.records["acme/mine"] is mine
        assert cache.vms.records["acme/theirs"] == other
        assert cache.vms.records["acme/theirs"] is not theirs
        cache.forget([key_theirs])
        assert not cache._expected


async def test_placements_and_hosts_named_by_assignments_follow_moves_and_relists(
    own_etcd: EtcdServer,
) -> None:
    """The per-host counts and VM -> host map the cache keeps in step with assignments
    (level-triggered lost detection and the snapshot read them) match a fresh listing
    after a move (new key put, old key deleted in one transaction) and a relist."""
    async with running(own_etcd) as (store, cache):
        spec = vm("a")
        a1 = Assignment(vm=spec, host="hv1", epoch=1)
        await store.put(keyspace.vm("acme", "a"), codec.dumps(spec))
        await store.put(keyspace.assignment("hv1", "acme", "a"), codec.dumps(a1))
        await cache.fresh()
        assert cache.assigned_hosts == {"hv1": 1} and dict(cache.placements) == {"acme/a": "hv1"}
        assert cache.unregistered() == {"hv1"}  # named, never registered
        assert [i.name for i in cache.host_infos()] == ["hv1"]
        a2 = Assignment(vm=spec, host="hv2", epoch=2)
        await store.commit(
            [],
            {keyspace.assignment("hv2", "acme", "a"): codec.dumps(a2)},
            [keyspace.assignment("hv1", "acme", "a")],
            fence=None,
        )
        await cache.fresh()
        assert cache.assigned_hosts == {"hv2": 1} and dict(cache.placements) == {"acme/a": "hv2"}
        assert dict(cache.snapshot().placements) == {"acme/a": "hv2"}
        # A relist (after compaction) rebuilds the same from scratch.
        await cache.close()
        await store.put(keyspace.vm("acme", "b"), codec.dumps(vm("b")))
        await store.put(
            keyspace.assignment("hv3", "acme", "b"),
            codec.dumps(Assignment(vm=vm("b"), host="hv3", epoch=1)),
        )
        now = await store.delete(keyspace.assignment("hv2", "acme", "a"))
        await store.compact(now)
        cache._task = asyncio.create_task(cache._follow())
        await eventually(lambda: cache.relists >= 2)
        assert cache.assigned_hosts == {"hv3": 1} and dict(cache.placements) == {"acme/b": "hv3"}
        assert cache.unregistered() == {"hv3"}


async def test_a_deleted_registration_is_dated_a_relisted_absence_is_not(
    etcd: EtcdServer,
) -> None:
    async with running(etcd) as (store, cache):
        lease = await register(store, host("hv1"))
        await cache.fresh()
        before = cache.clock()
        await store.revoke(lease)
        await cache.fresh()
        assert cache.gone_at["hv1"] >= before
        await register(store, host("hv1"))
        await cache.fresh()
        assert "hv1" not in cache.gone_at
