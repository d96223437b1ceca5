"""The planner against a real etcd: one fenced transaction per plan, epochs, moves,
conflicts retried, atomic batches, a deposed leader's plan rejected."""

from __future__ import annotations

import dataclasses

import pytest
from coord_support import host, register, running, vm
from hvplace.coordinator.planner import Planner
from hvplace.coordinator.store import Compare, Fence, FenceLost
from hvplace.proto import keyspace, models
from hvplace.proto.errors import Conflict
from hvplace.proto.models import Assignment, HostState, HostStatus, Phase, Rule, RuleKind, VMStatus
from support.etcd import EtcdServer


async def test_place_and_commit_new_vms_in_one_txn(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        await register(store, host("hv1"))
        await register(store, host("hv2"))
        await cache.fresh()
        planner = Planner(store, cache)
        vms = [vm("a"), vm("b")]
        before = await store.revision()
        extra = {keyspace.request("req-1"): b"{}"}
        absent = [Compare.absent(keyspace.vm("acme", v.name)) for v in vms]
        plan = await planner.place_and_commit(
            vms, atomic=True, extra_puts=extra, extra_compares=absent
        )
        assert set(plan.assignments) == {"acme/a", "acme/b"}
        # One transaction: one revision for every key.
        kvs, _ = await store.list_prefix(keyspace.ROOT)
        written = {kv.key: kv.mod_revision for kv in kvs if kv.mod_revision > before}
        assert len(set(written.values())) == 1
        assert keyspace.request("req-1") in written
        a = cache.assignments.records["acme/a"]
        assert a.epoch == 1 and a.host == plan.assignments["acme/a"]
        st = cache.vm_status.records["acme/a"]
        assert st.phase is Phase.SCHEDULED and st.host == a.host
        # The same create again fails its caller's precondition.
        with pytest.raises(Conflict):
            await planner.place_and_commit(vms, atomic=True, extra_compares=absent)


async def test_pending_with_reason_and_atomic_writes_nothing(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        await register(store, host("hv1", memory_mib=2048))
        await cache.fresh()
        planner = Planner(store, cache)
        rev = cache.revision
        plan = await planner.place_and_commit([vm("a"), vm("big", memory_mib=4096)], atomic=True)
        assert plan.pending and (await store.revision()) == rev
        plan = await planner.place_and_commit([vm("a"), vm("big", memory_mib=4096)], atomic=False)
        assert "acme/a" in plan.assignments and "acme/big" in plan.pending
        st = cache.vm_status.records["acme/big"]
        assert st.phase is Phase.PENDING and "memory" in st.reason and st.explanation is not None
        # Re-planning an unchanged pending VM writes nothing.
        rev = await store.revision()
        await planner.place_and_commit([cache.vms.records["acme/big"]], atomic=False)
        assert await store.revision() == rev


async def test_replace_lost_moves_with_higher_epoch(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        lease = await register(store, host("hv1"))
        await register(store, host("hv2"))
        await cache.fresh()
        planner = Planner(store, cache)
        rule = Rule(scope="acme", name="sep", kind=RuleKind.ANTI_AFFINITY, members=("a", "b"))
        await store.put(keyspace.rule("acme", "sep"), models.dumps(rule))
        await cache.fresh()
        plan = await planner.place_and_commit([vm("a")], atomic=False)
        src = plan.assignments["acme/a"]
        other = "hv2" if src == "hv1" else "hv1"
        await store.revoke(lease) if src == "hv1" else None
        if src == "hv2":
            pytest.skip("placement chose hv2; the lost-host path is covered by the controller test")
        await cache.fresh()
        outcome = await planner.replace_lost(["hv1"])
        assert outcome.plan.assignments == {"acme/a": other}
        a = cache.assignments.records["acme/a"]
        assert a.host == other and a.epoch == 2
        assert await store.get(keyspace.assignment("hv1", "acme", "a")) is None
        # b cannot go anywhere now: hv1 is lost and hv2 holds a.
        plan = await planner.place_and_commit([vm("b")], atomic=False)
        assert "acme/b" in plan.pending


async def test_conflict_is_retried_against_fresh_state(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        await register(store, host("hv1", memory_mib=2048))
        await cache.fresh()
        planner = Planner(store, cache)
        # Another writer cordons hv1 between our snapshot and our commit.
        real = store.commit
        raced = False

        async def racing_commit(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal raced
            if not raced:
                raced = True
                status = HostStatus("hv1", HostState.CORDONED)
                await store.put(keyspace.host_status("hv1"), models.dumps(status))
            return await real(*args, **kwargs)

        store.commit = racing_commit  # type: ignore[method-assign]
        plan = await planner.place_and_commit([vm("a")], atomic=False)
        assert planner.conflicts == 1
        assert "acme/a" in plan.pending  # re-planned: a cordoned host takes nothing


async def test_deposed_leader_cannot_commit(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        await register(store, host("hv1"))
        lease = await store.grant(5)
        leader = keyspace.ELECTION + f"{lease:x}"
        rev = await store.put(leader, b"c1", lease=lease)
        await cache.fresh()
        planner = Planner(store, cache, fence=lambda: Fence(leader, rev))
        await planner.place_and_commit([vm("a")], atomic=False)
        await store.revoke(lease)
        with pytest.raises(FenceLost):
            await planner.place_and_commit([vm("b")], atomic=False)
        assert await store.get(keyspace.vm("acme", "b")) is None


async def test_spec_change_rewrites_assignment_epoch_kept(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        await register(store, host("hv1"))
        await cache.fresh()
        planner = Planner(store, cache)
        await planner.place_and_commit([vm("a")], atomic=False)
        a = cache.assignments.records["acme/a"]
        assert isinstance(a, Assignment) and a.epoch == 1
        st = cache.vm_status.records["acme/a"]
        assert isinstance(st, VMStatus) and dataclasses.replace(st).host == "hv1"
