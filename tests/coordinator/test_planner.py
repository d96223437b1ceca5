"""The planner against a real etcd: one fenced transaction per plan, epochs, moves,
conflicts retried, atomic batches, a deposed leader's plan rejected."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from coord_support import host, register, running, vm
from hvplace.coordinator.planner import Planner
from hvplace.coordinator.store import Fence, FenceLost, Txn
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import Conflict
from hvplace.proto.records import Assignment, HostState, HostStatus, Phase, Rule, RuleKind, VMStatus
from hvplace.proto.selectors import LabelSelector
from support.etcd import EtcdServer


async def test_place_and_commit_new_vms_in_one_txn(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        await register(store, host("hv1"))
        await register(store, host("hv2"))
        await cache.fresh()
        planner = Planner(store, cache)
        vms = [vm("a"), vm("b")]
        before = await store.revision()

        def create() -> Txn:
            """The caller's side of the transaction: a request record, new names only."""
            txn = Txn(store)
            txn.put(keyspace.request("req-1"), b"{}")
            for v in vms:
                txn.require_absent(keyspace.vm("acme", v.name))
            return txn

        outcome = await planner.place_and_commit(vms, atomic=True, txn=create())
        plan = outcome.plan
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
        # The outcome holds the statuses exactly as committed.
        assert outcome.revision == written[keyspace.vm_status("acme", "a")]
        assert dict(outcome.statuses) == {
            k: cache.vm_status.records[k] for k in ("acme/a", "acme/b")
        }
        # The same create again fails its caller's precondition.
        with pytest.raises(Conflict):
            await planner.place_and_commit(vms, atomic=True, txn=create())


async def test_pending_with_reason_and_atomic_writes_nothing(etcd: EtcdServer) -> None:
    async with running(etcd) as (store, cache):
        await register(store, host("hv1", memory_mib=2048))
        await cache.fresh()
        planner = Planner(store, cache)
        rev = cache.revision
        plan = (
            await planner.place_and_commit([vm("a"), vm("big", memory_mib=4096)], atomic=True)
        ).plan
        assert plan.pending and (await store.revision()) == rev
        plan = (
            await planner.place_and_commit([vm("a"), vm("big", memory_mib=4096)], atomic=False)
        ).plan
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
        await store.put(keyspace.rule("acme", "sep"), codec.dumps(rule))
        await cache.fresh()
        plan = (await planner.place_and_commit([vm("a")], atomic=False)).plan
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
        plan = (await planner.place_and_commit([vm("b")], atomic=False)).plan
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
                await store.put(keyspace.host_status("hv1"), codec.dumps(status))
            return await real(*args, **kwargs)

        store.commit = racing_commit  # type: ignore[method-assign]
        plan = (await planner.place_and_commit([vm("a")], atomic=False)).plan
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


async def test_pipelined_fenced_commits_never_overbook_or_break_a_rule(etcd: EtcdServer) -> None:
    """Under a fence the next plan is computed while the previous one commits: it must
    count the placements still in flight. Ten concurrent batches fill the cluster
    exactly; capacity and a required anti-affinity group must hold in etcd."""
    async with running(etcd) as (store, cache):
        for i in range(10):
            await register(store, host(f"hv{i}", memory_mib=4196))
        lease = await store.grant(30)
        leader = keyspace.ELECTION + f"{lease:x}"
        rev = await store.put(leader, b"c1", lease=lease)
        rule = Rule(
            scope="acme",
            name="apart",
            kind=RuleKind.ANTI_AFFINITY,
            selector=LabelSelector(match_labels={"app": "db"}),
        )
        await store.put(keyspace.rule("acme", "apart"), codec.dumps(rule))
        await cache.fresh()
        planner = Planner(store, cache, fence=lambda: Fence(leader, rev))
        sent: list[int] = []
        real_commit = store.commit

        async def slow_commit(*args: object, **kwargs: object) -> int:
            # Every transaction lingers a little, so plans overlap their commits.
            sent.append(len(planner._inflight))
            await asyncio.sleep(0.02)
            return await real_commit(*args, **kwargs)  # type: ignore[arg-type]

        store.commit = slow_commit  # type: ignore[method-assign]
        batches = [
            [vm(f"b{b}-{i}", memory_mib=1024) for i in range(4)]
            + [vm(f"db{b}", memory_mib=64, app="db")]
            for b in range(10)
        ]  # 40 x 1 GiB + 10 x 64 MiB on 10 hosts of 4196 MiB: 4 + one db per host, full
        plans = await asyncio.gather(
            *(planner.place_and_commit(batch, atomic=False) for batch in batches)
        )
        assert max(sent) >= 2, "the batches never overlapped: the test proves nothing"
        assert sum(len(o.plan.assignments) for o in plans) == 50
        await cache.fresh()
        per_host: dict[str, int] = {}
        dbs: dict[str, int] = {}
        for key, a in cache.assignments.records.items():
            per_host[a.host] = per_host.get(a.host, 0) + a.vm.resources.memory_mib
            if key.split("/")[1].startswith("db"):
                dbs[a.host] = dbs.get(a.host, 0) + 1
        assert max(per_host.values()) <= 4196
        assert max(dbs.values()) == 1 and len(dbs) == 10
        assert not planner._inflight


async def test_failover_never_commits_once_the_lost_host_registered_again(
    etcd: EtcdServer,
) -> None:
    """The returning agent reads its assignments right after it registers: a failover
    planned while the host was away must not commit after that registration, or the
    VM would run on the returning host (old assignment) and on its new one."""
    async with running(etcd) as (store, cache):
        lease = await register(store, host("hv1"))
        await cache.fresh()
        planner = Planner(store, cache)
        await planner.place_and_commit([vm("a")], atomic=False)
        await store.revoke(lease)
        await register(store, host("hv2"))
        await cache.fresh()
        assert cache.assignments.records["acme/a"].host == "hv1"
        real = store.commit
        raced = False

        async def returning_commit(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal raced
            if not raced:
                raced = True  # hv1's agent registers between the plan and its commit
                await register(store, host("hv1"))
            return await real(*args, **kwargs)

        store.commit = returning_commit  # type: ignore[method-assign]
        with pytest.raises(Conflict):
            await planner.replace_lost(["hv1"])
        kv = await store.get(keyspace.assignment("hv1", "acme", "a"))
        assert kv is not None  # still hv1's: it may be running there already
        assert await store.get(keyspace.assignment("hv2", "acme", "a")) is None
