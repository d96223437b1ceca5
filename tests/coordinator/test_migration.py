"""Live migration on the coordinator side, against a real etcd: the record is the target's
reservation (concurrent requests under anti-affinity), an explicit target is refused with the
rule, and settling follows what the agents report (written here as the agents write them:
their DomainStatus under their lease). The agents' side runs in tests/e2e/test_maintenance.py."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from hvplace.cli import main as cli
from hvplace.coordinator.drain import Drain, Progress
from hvplace.coordinator.migration import (
    MigrationFailed,
    Migrations,
    Verdict,
    decide,
)
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import Unavailable
from hvplace.proto.records import (
    DomainState,
    DomainStatus,
    HostInfo,
    HostState,
    Migration,
    Resources,
)
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc
from support.api import Api, running_api
from support.etcd import EtcdServer
from support.wait import eventually

IMAGE = pb.Image(kernel="/boot/vmlinuz")
CONFLICT_CODE = grpc.StatusCode.FAILED_PRECONDITION


async def add_host(api: Api, name: str) -> int:
    info = HostInfo(
        name=name,
        capacity=Resources(vcpus=16, memory_mib=32768, disk_gib=1000),
        domain_type="test",
        address=f"10.0.0.{len(name)}",
        migration_uri=f"qemu+tcp://{name}/system",
        console_dir=f"/var/lib/{name}/console",
    )
    lease = await api.client.lease(60)
    await api.client.put(keyspace.host(name).encode(), codec.dumps(info), lease=lease)
    await api.backend.fresh_view()  # placement sees the host before any VM is created
    return int(lease.id)


async def members(api: Api, names: list[str]) -> dict[str, str]:
    """Create anti-affinity members (one batch) and return where each runs."""
    await api.rule.CreateRule(
        pb.CreateRuleRequest(
            rule=pb.Rule(scope="acme", name="spread", kind="anti_affinity", members=names)
        )
    )
    vms = [
        pb.VM(scope="acme", name=n, image=IMAGE, resources=pb.Resources(vcpus=1, memory_mib=256))
        for n in names
    ]
    resp = await api.vm.CreateVMs(pb.CreateVMsRequest(vms=vms))
    return {v.spec.name: v.status.host for v in resp.vms}


def migrations_of(api: Api) -> Migrations:
    b = api.backend
    return Migrations(b.store, b.cache, b.planner)


async def report(api: Api, status: DomainStatus) -> None:
    """What an agent writes: its domain's status under its own key."""
    key = keyspace.domain(status.host, status.scope, status.name)
    await api.client.put(key.encode(), codec.dumps(status))


async def test_concurrent_migrations_under_anti_affinity_take_distinct_hosts(
    etcd: EtcdServer,
) -> None:
    """Nova bug 1821755: three members on three hosts, one free host. Three migrations
    requested at once: one reserves the free host, the others are refused (no host left
    that no member holds, counting the first one's reservation) — never two on one host."""
    async with running_api(etcd, fenced=True) as api:
        for i in range(4):
            await add_host(api, f"h{i}")
        where = await members(api, ["a", "b", "c"])
        free = ({"h0", "h1", "h2", "h3"} - set(where.values())).pop()
        mig = migrations_of(api)
        results = await asyncio.gather(
            *(mig.migrate_vm("acme", n, wait=False) for n in ("a", "b", "c")),
            return_exceptions=True,
        )
        started = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(started) == 1 and started[0].target == free
        assert len(refused) == 2
        for err in refused:
            assert isinstance(err, Unavailable) and "anti-affinity rule `spread`" in err.message
        records = api.etcd.etcdctl("get", "--prefix", "--keys-only", keyspace.MIGRATIONS)
        assert len([k for k in records.splitlines() if k.strip()]) == 2  # source and target


async def test_a_create_joining_the_rule_cannot_take_the_reserved_host(etcd: EtcdServer) -> None:
    async with running_api(etcd, fenced=True) as api:
        for i in range(3):
            await add_host(api, f"h{i}")
        where = await members(api, ["a", "b"])
        free = ({"h0", "h1", "h2"} - set(where.values())).pop()
        got = await migrations_of(api).migrate_vm("acme", "a", wait=False)
        assert got.target == free
        await api.rule.UpdateRule(
            pb.UpdateRuleRequest(
                rule=pb.Rule(
                    scope="acme", name="spread", kind="anti_affinity", members=["a", "b", "c"]
                )
            )
        )
        resp = await api.vm.CreateVMs(
            pb.CreateVMsRequest(vms=[pb.VM(scope="acme", name="c", image=IMAGE)])
        )
        status = resp.vms[0].status
        assert status.phase == "pending" and "anti-affinity rule `spread`" in status.reason


async def test_an_explicit_target_breaking_a_rule_is_refused_over_the_api(
    etcd: EtcdServer,
) -> None:
    async with running_api(etcd, fenced=True) as api:
        for i in range(3):
            await add_host(api, f"h{i}")
        where = await members(api, ["a", "b"])
        stub = pb_grpc.MaintenanceServiceStub(api.channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.MigrateVM(pb.MigrateVMRequest(scope="acme", name="a", to=where["b"]))
        assert info.value.code() == CONFLICT_CODE
        assert f"cannot move acme/a to {where['b']}: anti-affinity rule `spread`" in (
            info.value.details() or ""
        )
        dry = await stub.MigrateVM(pb.MigrateVMRequest(scope="acme", name="a", dry_run=True))
        assert dry.mode == "none" and dry.source == where["a"]
        assert dry.target not in (where["a"], where["b"])
        none = api.etcd.etcdctl("get", "--prefix", "--keys-only", keyspace.MIGRATIONS)
        assert none.strip() == ""  # refusal and dry run wrote nothing
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.MigrateVM(pb.MigrateVMRequest(scope="acme", name="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_failure_reported_by_the_source_leaves_the_vm_where_it_was(
    etcd: EtcdServer,
) -> None:
    async with running_api(etcd, fenced=True) as api:
        for i in range(2):
            await add_host(api, f"h{i}")
        await api.vm.CreateVMs(
            pb.CreateVMsRequest(vms=[pb.VM(scope="acme", name="a", image=IMAGE)])
        )
        mig = migrations_of(api)
        cache = api.backend.cache
        a = cache.assignments.records["acme/a"]
        moving = asyncio.ensure_future(mig.migrate_vm("acme", "a"))
        await eventually(lambda: "acme/a" in cache.migrations.records)
        m = cache.migrations.records["acme/a"]
        await report(
            api,
            DomainStatus(
                scope="acme",
                name="a",
                host=a.host,
                uid=a.vm.uid,
                epoch=a.epoch,
                state=DomainState.RUNNING,
                migration_error="unable to connect to server: Connection refused",
                migration_started_at=m.started_at,
            ),
        )
        await api.backend.fresh_view()
        assert await mig.settle() is None
        with pytest.raises(MigrationFailed) as info:
            await moving
        assert "stays on" in info.value.message and "Connection refused" in info.value.message
        after = cache.assignments.records["acme/a"]
        assert (after.host, after.epoch) == (a.host, a.epoch)
        assert "acme/a" not in cache.migrations.records
        assert "Connection refused" in cache.vm_status.records["acme/a"].reason
        assert m.target != a.host


async def test_completion_moves_the_assignment_with_a_higher_epoch_to_adopt(
    etcd: EtcdServer,
) -> None:
    async with running_api(etcd, fenced=True) as api:
        for i in range(2):
            await add_host(api, f"h{i}")
        await api.vm.CreateVMs(
            pb.CreateVMsRequest(vms=[pb.VM(scope="acme", name="a", image=IMAGE)])
        )
        mig = migrations_of(api)
        cache = api.backend.cache
        a = cache.assignments.records["acme/a"]
        moving = asyncio.ensure_future(mig.migrate_vm("acme", "a"))
        await eventually(lambda: "acme/a" in cache.migrations.records)
        m = cache.migrations.records["acme/a"]
        base = DomainStatus(scope="acme", name="a", host=a.host, uid=a.vm.uid, epoch=a.epoch)
        # The target runs the incoming guest paused; the source still runs it: wait.
        await report(
            api, dataclasses.replace(base, state=DomainState.RUNNING, migrating_to=m.target)
        )
        await report(api, dataclasses.replace(base, host=m.target, state=DomainState.PAUSED))
        await api.backend.fresh_view()
        assert await mig.settle() is not None
        assert "acme/a" in cache.migrations.records
        # libvirt reports completion: the source's copy is gone, the target's runs.
        await report(
            api,
            dataclasses.replace(
                base,
                state=DomainState.DEFINED,
                migrated_to=m.target,
                migration_started_at=m.started_at,
            ),
        )
        await report(api, dataclasses.replace(base, host=m.target, state=DomainState.RUNNING))
        await api.backend.fresh_view()
        await mig.settle()
        result = await moving
        assert (result.source, result.target, result.mode) == (a.host, m.target, "live")
        now = cache.assignments.records["acme/a"]
        assert (now.host, now.epoch, now.adopt_epoch) == (m.target, a.epoch + 1, a.epoch)
        old = api.etcd.etcdctl("get", keyspace.assignment(a.host, "acme", "a"))
        assert old.strip() == ""


def _record(**kw: object) -> Migration:
    base = Migration(scope="s", name="a", uid="u", source="src", target="dst", epoch=3)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def _dom(host: str, state: DomainState, **kw: object) -> DomainStatus:
    return DomainStatus(scope="s", name="a", host=host, uid="u", epoch=3, state=state, **kw)  # type: ignore[arg-type]


def _decide(**kw: object) -> Verdict:
    from hvplace.proto.records import VM, Assignment

    args: dict[str, object] = {
        "assignment": Assignment(vm=VM(scope="s", name="a", uid="u"), host="src", epoch=3),
        "spec_exists": True,
        "source_alive": True,
        "target_alive": True,
        "source": _dom("src", DomainState.RUNNING),
        "target": None,
        "now": 10.0,
    }
    args.update(kw)
    return decide(_record(started_at=5.0, timeout_s=60.0), **args)  # type: ignore[arg-type]


R, P, D = DomainState.RUNNING, DomainState.PAUSED, DomainState.DEFINED
DECISIONS = [
    ("in flight", {"target": _dom("dst", P)}, "wait"),
    (
        "libvirt done",
        {
            "source": _dom("src", D, migrated_to="dst", migration_started_at=5.0),
            "target": _dom("dst", R),
        },
        "complete",
    ),
    ("target runs, source still reports running", {"target": _dom("dst", R)}, "wait"),
    ("source lost, target runs", {"source_alive": False, "target": _dom("dst", R)}, "complete"),
    ("source lost, target paused", {"source_alive": False, "target": _dom("dst", P)}, "abort"),
    ("target lost", {"target_alive": False}, "abort"),
    (
        "libvirt failed",
        {"source": _dom("src", R, migration_error="boom", migration_started_at=5.0)},
        "abort",
    ),
    (
        "an earlier attempt's failure",
        {"source": _dom("src", R, migration_error="boom", migration_started_at=4.0)},
        "wait",
    ),
    ("VM deleted", {"spec_exists": False}, "abort"),
    ("timed out", {"now": 5.0 + 60 + 31}, "abort"),
    (
        "target runs an older epoch",
        {"source": None, "target": dataclasses.replace(_dom("dst", R), epoch=2)},
        "wait",
    ),
]


@pytest.mark.parametrize(
    ("case", "expected"), [(d[1], d[2]) for d in DECISIONS], ids=[d[0] for d in DECISIONS]
)
def test_settle_decisions(case: dict[str, object], expected: str) -> None:
    assert _decide(**case).action == expected


async def test_a_new_leader_settles_a_migration_the_old_one_started(etcd: EtcdServer) -> None:
    """Derived, not remembered: the record and the agents' reports are all a coordinator
    needs; the one that started a migration may be gone before libvirt finishes."""
    async with running_api(etcd, fenced=True) as api:
        for i in range(2):
            await add_host(api, f"h{i}")
        await api.vm.CreateVMs(
            pb.CreateVMsRequest(vms=[pb.VM(scope="acme", name="a", image=IMAGE)])
        )
        started = await migrations_of(api).migrate_vm("acme", "a", wait=False)
        a = api.backend.cache.assignments.records["acme/a"]
    async with running_api(etcd, fenced=True) as api:
        cache = api.backend.cache
        assert cache.migrations.records["acme/a"].target == started.target
        base = DomainStatus(scope="acme", name="a", host=a.host, uid=a.vm.uid, epoch=a.epoch)
        await report(
            api,
            dataclasses.replace(
                base,
                state=DomainState.DEFINED,
                migrated_to=started.target,
                migration_started_at=cache.migrations.records["acme/a"].started_at,
            ),
        )
        await report(api, dataclasses.replace(base, host=started.target, state=DomainState.RUNNING))
        await api.backend.fresh_view()
        assert await migrations_of(api).settle() is None
        now = cache.assignments.records["acme/a"]
        assert (now.host, now.epoch, now.adopt_epoch) == (started.target, a.epoch + 1, a.epoch)
        assert "acme/a" not in cache.migrations.records


async def test_a_cold_move_starts_on_the_target_once_the_source_stopped(etcd: EtcdServer) -> None:
    async with running_api(etcd, fenced=True) as api:
        for i in range(2):
            await add_host(api, f"h{i}")
        await api.vm.CreateVMs(
            pb.CreateVMsRequest(vms=[pb.VM(scope="acme", name="a", image=IMAGE)])
        )
        cache = api.backend.cache
        a = cache.assignments.records["acme/a"]
        mig = migrations_of(api)
        await report(
            api,
            DomainStatus(
                scope="acme",
                name="a",
                host=a.host,
                uid=a.vm.uid,
                epoch=a.epoch,
                state=DomainState.RUNNING,
            ),
        )
        started = await mig.migrate_vm("acme", "a", restart=True, wait=False)
        assert started.mode == "restart"
        assert "acme/a" not in cache.assignments.records  # the source stops it
        await api.backend.fresh_view()
        assert await mig.settle() is not None  # still running there: wait
        assert "acme/a" not in cache.assignments.records
        await api.client.delete(keyspace.domain(a.host, "acme", "a").encode())  # stopped
        await api.backend.fresh_view()
        await mig.settle()
        now = cache.assignments.records["acme/a"]
        assert (now.host, now.epoch, now.adopt_epoch) == (started.target, a.epoch + 1, 0)


async def test_drain_dry_run_over_the_api_lists_moves_and_what_stays(etcd: EtcdServer) -> None:
    async with running_api(etcd, fenced=True) as api:
        for i in range(2):
            await add_host(api, f"h{i}")
        where = await members(api, ["a", "b"])
        stub = pb_grpc.MaintenanceServiceStub(api.channel)
        lines = [p async for p in stub.Drain(pb.DrainRequest(host=where["a"], dry_run=True))]
        assert [(p.vm, p.state) for p in lines] == [("acme/a", "stays")]
        assert "anti-affinity rule `spread`" in lines[0].reason
        assert api.etcd.etcdctl("get", "--prefix", "--keys-only", keyspace.MIGRATIONS).strip() == ""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [p async for p in stub.Drain(pb.DrainRequest(host="nope"))]
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_per_vm_migration_setting_is_kept_and_checked(etcd: EtcdServer) -> None:
    async with running_api(etcd, fenced=True) as api:
        await add_host(api, "h0")
        vm = pb.VM(scope="acme", name="a", image=IMAGE, migration="live_or_restart")
        await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm]))
        got = await api.vm.GetVM(pb.VMRef(scope="acme", name="a"))
        assert got.spec.migration == "live_or_restart"
        bad = pb.VM(scope="acme", name="b", image=IMAGE, migration="teleport")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[bad]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "migration" in (info.value.details() or "")


async def test_drain_falls_back_to_a_cold_restart_where_the_vm_allows_it(
    etcd: EtcdServer,
) -> None:
    """The VM's `live_or_restart`: libvirt refuses the live move, the drain restarts it on
    the other host, and the host ends `drained`."""
    async with running_api(etcd, fenced=True) as api:
        for i in range(2):
            await add_host(api, f"h{i}")
        vm = pb.VM(scope="acme", name="a", image=IMAGE, migration="live_or_restart")
        await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm]))
        cache = api.backend.cache
        a = cache.assignments.records["acme/a"]
        running = DomainStatus(
            scope="acme",
            name="a",
            host=a.host,
            uid=a.vm.uid,
            epoch=a.epoch,
            state=DomainState.RUNNING,
        )
        await report(api, running)
        mig = migrations_of(api)
        drain = Drain(api.backend.store, cache, mig)
        lines: list[Progress] = []

        async def run() -> None:
            async for p in drain.run(a.host):
                lines.append(p)

        draining = asyncio.ensure_future(run())
        # The source agent's part: libvirt refuses the live move...
        await eventually(lambda: "acme/a" in cache.migrations.records)
        assert not cache.migrations.records["acme/a"].restart
        live = cache.migrations.records["acme/a"]
        await report(
            api,
            dataclasses.replace(
                running, migration_error="p2p refused", migration_started_at=live.started_at
            ),
        )
        await api.backend.fresh_view()
        await mig.settle()
        # ...then the cold move: the guest stops here (its status goes), starts there.
        await eventually(
            lambda: (m := cache.migrations.records.get("acme/a")) is not None and m.restart
        )
        await api.client.delete(keyspace.domain(a.host, "acme", "a").encode())
        await api.backend.fresh_view()
        await mig.settle()
        await asyncio.wait_for(draining, 30)
        states = [(p.vm, p.state) for p in lines]
        assert ("acme/a", "restarted") in states and states[-1] == ("", "drained")
        assert "p2p refused" in next(p.reason for p in lines if p.state == "restarted")
        assert cache.assignments.records["acme/a"].host != a.host
        assert cache.host_status.records[a.host].state is HostState.DRAINED


async def test_the_cli_migrates_dry_runs_and_refuses_with_the_rule(
    etcd: EtcdServer, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_api(etcd, fenced=True) as api:
        for i in range(3):
            await add_host(api, f"h{i}")
        where = await members(api, ["a", "b"])

        async def run(*argv: str) -> tuple[int, str, str]:
            args = ["--endpoint", api.endpoint, "--timeout", "5", *argv]
            code = await asyncio.to_thread(cli.main, args)
            out, err = capsys.readouterr()
            return code, out, err

        code, out, _ = await run("vm", "migrate", "acme/a", "--dry-run")
        assert code == 0 and f"acme/a would move {where['a']} -> " in out
        code, _, err = await run("vm", "migrate", "acme/a", "--to", where["b"])
        assert code == 1
        assert f"conflict: cannot move acme/a to {where['b']}: anti-affinity rule `spread`" in err
        code, out, _ = await run("host", "drain", where["a"], "--dry-run")
        assert code == 0 and "acme/a" in out and "planned" in out
        code, _, err = await run("host", "drain", where["a"], "--parallel", "99")
        assert code == 1 and "parallel 99" in err


async def test_a_lost_source_settles_by_what_the_target_runs(etcd: EtcdServer) -> None:
    """The source's lease ends mid-migration (its agent fenced). The target already runs
    the guest: the move completes. Had the switchover not happened, it would abort and
    the failover would re-place the VM (see the decision table)."""
    async with running_api(etcd, fenced=True) as api:
        leases = {f"h{i}": await add_host(api, f"h{i}") for i in range(2)}
        await api.vm.CreateVMs(
            pb.CreateVMsRequest(vms=[pb.VM(scope="acme", name="a", image=IMAGE)])
        )
        cache = api.backend.cache
        a = cache.assignments.records["acme/a"]
        mig = migrations_of(api)
        started = await mig.migrate_vm("acme", "a", wait=False)
        await report(
            api,
            DomainStatus(
                scope="acme",
                name="a",
                host=started.target,
                uid=a.vm.uid,
                epoch=a.epoch,
                state=DomainState.RUNNING,
            ),
        )
        await api.client.revoke_lease(leases[a.host])  # the source host is lost
        await api.backend.fresh_view()
        assert a.host not in cache.hosts.records
        await mig.settle()
        now = cache.assignments.records["acme/a"]
        assert (now.host, now.adopt_epoch) == (started.target, a.epoch)


def test_failover_leaves_a_migrating_vm_to_its_migration() -> None:
    from hvplace.coordinator.failure import replace_lost
    from hvplace.coordinator.snapshot import Snapshot
    from hvplace.proto.records import VM, Host

    hosts = {n: Host(name=n, capacity=Resources(8, 8192, 100)) for n in ("h0", "h1", "h2")}
    vms = {k: VM(scope="s", name=k.split("/")[1], uid=k) for k in ("s/a", "s/b")}
    snap = Snapshot(
        revision=1,
        hosts=hosts,
        vms=vms,
        placements={"s/a": "h0", "s/b": "h0"},
        reservations={"s/a": "h1"},
    )
    plan = replace_lost(snap, {"h0"})
    assert set(plan.assignments) == {"s/b"}
