"""The cold mover's safety against a real etcd, hosts played by records (no agent answers):
it never re-assigns a VM whose host has not reported it stopped at the new epoch; a move
that times out gives the VM back its power where it was; a move cut short (its
coordinator died) is repaired from the records; a host without a registration (its agent
fenced itself) lets the move go on."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from hvplace.coordinator.moves import MOVING, ColdMover
from hvplace.proto import codec, keyspace
from hvplace.proto.errors import Conflict, Unavailable
from hvplace.proto.records import Assignment, DomainState, DomainStatus, Power
from hvplace.proto.v1 import hvplace_pb2 as pb
from support.api import Api, running_api
from support.etcd import EtcdServer


@pytest.fixture
async def api(etcd: EtcdServer) -> AsyncIterator[Api]:
    async with running_api(etcd) as a:
        yield a


async def placed_on_h1(api: Api) -> Assignment:
    await api.add_host("h1")
    await api.backend.fresh_view()
    spec = pb.VM(scope="acme", name="a", resources=pb.Resources(vcpus=1, memory_mib=64))
    spec.image.CopyFrom(pb.Image(kernel="/boot/k"))
    await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[spec]))
    await api.add_host("h2")
    view = await api.backend.fresh_view()
    assert "h2" in view.hosts
    return view.assignments["acme/a"]


def mover(api: Api, timeout: float) -> ColdMover:
    b = api.backend
    return ColdMover(b.store, b.cache, b.planner, stop_timeout_s=timeout)


async def test_no_stop_report_no_move_and_the_vm_gets_its_power_back(api: Api) -> None:
    before = await placed_on_h1(api)
    with pytest.raises(Unavailable, match="did not report it stopped"):
        await mover(api, 1.0).move("acme/a", "h2")
    view = await api.backend.fresh_view()
    a = view.assignments["acme/a"]
    assert a.host == "h1" and a.vm.power is Power.RUNNING  # restarts where it was
    assert a.epoch == before.epoch + 1  # the stop's epoch: the old domain is gone for good
    # A report at the OLD epoch (written before the move, say) does not count.
    stale = DomainStatus(
        scope="acme",
        name="a",
        host="h1",
        uid=a.vm.uid,
        epoch=before.epoch,
        state=DomainState.STOPPED,
    )
    await api.client.put(keyspace.domain("h1", "acme", "a").encode(), codec.dumps(stale))
    with pytest.raises(Unavailable):
        await mover(api, 1.0).move("acme/a", "h2")
    assert (await api.backend.fresh_view()).assignments["acme/a"].host == "h1"


async def test_a_report_at_the_new_epoch_lets_the_move_commit(api: Api) -> None:
    before = await placed_on_h1(api)
    m = mover(api, 30.0)
    cache = api.backend.cache
    task = asyncio.create_task(m.move("acme/a", "h2"))

    def stopping() -> Assignment | None:
        a = cache.assignments.records.get("acme/a")
        return a if a is not None and a.vm.power is Power.STOPPED else None

    async with asyncio.timeout(30):
        while (a := stopping()) is None:  # noqa: ASYNC110 - the cache has no event for it
            await asyncio.sleep(0.02)
    assert a.host == "h1" and a.epoch == before.epoch + 1
    status = cache.vm_status.records["acme/a"]
    assert status.reason.startswith(MOVING + "h2")
    # As h1's agent would after destroying the old epoch's domain: defined, off.
    report = DomainStatus(
        scope="acme",
        name="a",
        host="h1",
        uid=a.vm.uid,
        epoch=a.epoch,
        state=DomainState.DEFINED,
    )
    await api.client.put(keyspace.domain("h1", "acme", "a").encode(), codec.dumps(report))
    await task
    view = await api.backend.fresh_view()
    moved = view.assignments["acme/a"]
    assert moved.host == "h2" and moved.vm.power is Power.RUNNING and moved.epoch > a.epoch
    assert not (await api.client.get(keyspace.assignment("h1", "acme", "a").encode()))


async def test_an_interrupted_move_is_repaired_from_the_records(api: Api) -> None:
    before = await placed_on_h1(api)
    view = api.backend.view()
    status = view.vm_status["acme/a"]
    stopped = Assignment(
        vm=dataclasses.replace(before.vm, power=Power.STOPPED), host="h1", epoch=before.epoch + 1
    )
    moving = dataclasses.replace(status, reason=f"{MOVING}h2: stopping on h1")
    await api.client.put(keyspace.assignment("h1", "acme", "a").encode(), codec.dumps(stopped))
    await api.client.put(keyspace.vm_status("acme", "a").encode(), codec.dumps(moving))
    await api.backend.fresh_view()
    assert await mover(api, 1.0).repair_interrupted() == 1
    view = await api.backend.fresh_view()
    assert view.assignments["acme/a"].vm.power is Power.RUNNING
    assert view.assignments["acme/a"].host == "h1"
    # A VM an operator stopped (no move under way) is left alone.
    await api.vm.StopVM(pb.VMRef(scope="acme", name="a"))
    await api.backend.fresh_view()
    assert await mover(api, 1.0).repair_interrupted() == 0


async def test_a_target_the_rules_refuse_is_refused_before_anything_is_written(api: Api) -> None:
    await placed_on_h1(api)
    await api.host.CordonHost(pb.HostRef(name="h2"))
    revision = (await api.backend.fresh_view()).revision
    with pytest.raises(Conflict, match="cannot move to h2"):
        await mover(api, 1.0).move("acme/a", "h2")
    assert (await api.backend.fresh_view()).revision == revision


async def test_a_host_without_registration_needs_no_stop_report(api: Api, etcd: EtcdServer) -> None:
    await placed_on_h1(api)
    # h1's registration is gone: its agent lost its lease and fenced itself.
    etcd.etcdctl("del", keyspace.host("h1"))
    await api.backend.fresh_view()
    await mover(api, 1.0).move("acme/a", "h2")
    assert (await api.backend.fresh_view()).assignments["acme/a"].host == "h2"
