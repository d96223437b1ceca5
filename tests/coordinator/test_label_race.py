"""A label change and a placement decided at the same time must not break a rule between
them (SPEC §5: no required rule broken): each is checked against the records the other
is writing. A host's labels and a VM's labels are relabelled while a create's plan,
computed under the old labels, is in flight to etcd; the relabel must wait for it and
then be checked with that VM in place (refused), never pass on the view before it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
import pytest
from hvplace.coordinator.store import Compare, Fence, Store
from hvplace.proto.v1 import hvplace_pb2 as pb
from support.api import Api, running_api
from support.etcd import EtcdServer

IMAGE = pb.Image(kernel="/boot/k", initrd="/boot/i")


def vm(name: str, **labels: str) -> pb.VM:
    spec = pb.VM(scope="acme", name=name, labels=labels)
    spec.resources.CopyFrom(pb.Resources(vcpus=1, memory_mib=256))
    spec.image.CopyFrom(IMAGE)
    return spec


class Gate:
    """Holds the next planner commit (one that writes an assignment) before it is sent
    to etcd, until opened: the plan is then in flight, as under load."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.held = asyncio.Event()
        self.open = asyncio.Event()
        self._commit = store.commit
        store.commit = self._gated  # type: ignore[method-assign]

    async def _gated(
        self,
        compares: Sequence[Compare],
        puts: Mapping[str, bytes],
        deletes: Sequence[str] = (),
        *,
        fence: Fence | None,
        lease: int = 0,
    ) -> int:
        if not self.held.is_set() and any("/assignments/" in k for k in puts):
            self.held.set()
            await self.open.wait()
        return await self._commit(compares, puts, deletes, fence=fence, lease=lease)


@pytest.fixture
async def api(etcd: EtcdServer) -> AsyncIterator[Api]:
    async with running_api(etcd, fenced=True) as a:
        yield a


async def _rule_holds(api: Api, name: str) -> pb.RuleView:
    view: pb.RuleView = await api.rule.GetRule(pb.RuleRef(scope="acme", name=name))
    return view


async def test_a_host_relabelled_while_a_plan_is_in_flight_is_checked_with_it(
    api: Api,
) -> None:
    await api.add_host("h1", labels={"rack": "r1"})
    await api.add_host("h2", labels={"rack": "r2"})
    apart = pb.Rule(
        scope="acme",
        name="apart",
        kind="anti_affinity",
        enforcement="required",
        members=["a", "b"],
        topology_key="rack",
    )
    await api.rule.CreateRule(pb.CreateRuleRequest(rule=apart))
    # a on h1 (h2 cordoned meanwhile)
    await api.host.CordonHost(pb.HostRef(name="h2"))
    await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("a")]))
    await api.host.UncordonHost(pb.HostRef(name="h2"))
    gate = Gate(api.backend.store)
    # b's plan (h2, the other rack) is computed and held before etcd.
    creating = asyncio.ensure_future(api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("b")])))
    await asyncio.wait_for(gate.held.wait(), 30)
    # h1 moved into h2's rack while b's plan is in flight.
    relabel = asyncio.ensure_future(
        api.host.LabelHost(pb.LabelHostRequest(name="h1", set={"rack": "r2"}))
    )
    # Given a moment to go through (it must not: it would be checked without b).
    await asyncio.wait({relabel}, timeout=1.0)
    gate.open.set()
    created = await asyncio.wait_for(creating, 30)
    assert created.vms[0].status.host == "h2"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(relabel, 30)
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert "apart" in (e.value.details() or "")
    view = await _rule_holds(api, "apart")
    assert view.satisfied, view.violations


async def test_a_vm_relabelled_while_a_plan_is_in_flight_is_checked_with_it(api: Api) -> None:
    await api.add_host("h1")
    await api.add_host("h2")
    # VMs labelled role=db keep to one per host.
    dbs = pb.Rule(
        scope="acme",
        name="dbs",
        kind="anti_affinity",
        enforcement="required",
        selector=pb.LabelSelector(match_labels={"role": "db"}),
    )
    await api.rule.CreateRule(pb.CreateRuleRequest(rule=dbs))
    await api.host.CordonHost(pb.HostRef(name="h2"))  # everything goes to h1
    await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("a", role="web")]))
    gate = Gate(api.backend.store)
    # c, a db, is planned beside a (a web VM then) and held before etcd.
    creating = asyncio.ensure_future(
        api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("c", role="db")]))
    )
    await asyncio.wait_for(gate.held.wait(), 30)
    # a becomes a db while c's plan is in flight.
    relabel = asyncio.ensure_future(
        api.vm.LabelVM(pb.LabelVMRequest(scope="acme", name="a", set={"role": "db"}))
    )
    await asyncio.wait({relabel}, timeout=1.0)
    gate.open.set()
    created = await asyncio.wait_for(creating, 30)
    assert created.vms[0].status.host == "h1"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(relabel, 30)
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert "dbs" in (e.value.details() or "")
    view = await _rule_holds(api, "dbs")
    assert view.satisfied, view.violations
