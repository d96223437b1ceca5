"""A label change and a placement decided at the same time must not break a rule between
them (SPEC §5: no required rule broken): each is checked against the records the other
is writing. A host's labels and a VM's labels are relabelled while a create's plan,
computed under the old labels, is in flight to etcd; the relabel must wait for it and
then be checked with that VM in place (refused), never pass on the view before it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

import grpc
import pytest
from hvplace.coordinator.store import Compare, Store
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
        self.held = asyncio.Event()
        self.open = asyncio.Event()
        commit = store.commit

        async def gated(compares: Sequence[Compare], puts: Mapping[str, bytes], *a, **kw):  # type: ignore[no-untyped-def]
            if not self.held.is_set() and any("/assignments/" in k for k in puts):
                self.held.set()
                await self.open.wait()
            return await commit(compares, puts, *a, **kw)

        store.commit = gated  # type: ignore[method-assign]


async def race(
    api: Api, create: pb.VM, relabel: Callable[[], Awaitable[object]], rule: str
) -> pb.VMView:
    """Create `create` with its plan held before etcd, call `relabel` meanwhile (given a
    moment to go through: it must not, it would be checked without the new VM), then let
    the plan go: the relabel is refused naming `rule`, and `rule` holds."""
    gate = Gate(api.backend.store)
    creating = asyncio.ensure_future(api.vm.CreateVMs(pb.CreateVMsRequest(vms=[create])))
    await asyncio.wait_for(gate.held.wait(), 30)
    relabelling = asyncio.ensure_future(relabel())
    await asyncio.wait({relabelling}, timeout=1.0)
    gate.open.set()
    created: pb.CreateVMsResponse = await asyncio.wait_for(creating, 30)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(relabelling, 30)
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert rule in (e.value.details() or "")
    view: pb.RuleView = await api.rule.GetRule(pb.RuleRef(scope="acme", name=rule))
    assert view.satisfied, view.violations
    return created.vms[0]


@pytest.fixture
async def api(etcd: EtcdServer) -> AsyncIterator[Api]:
    async with running_api(etcd, fenced=True) as a:
        yield a


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
    await api.host.CordonHost(pb.HostRef(name="h2"))  # a on h1
    await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("a")]))
    await api.host.UncordonHost(pb.HostRef(name="h2"))
    # b's plan (h2, the other rack) in flight while h1 moves into h2's rack.
    relabel = pb.LabelHostRequest(name="h1", set={"rack": "r2"})
    b = await race(api, vm("b"), lambda: api.host.LabelHost(relabel), "apart")
    assert b.status.host == "h2"


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
    # c, a db, planned beside a (a web VM then) while a becomes a db.
    relabel = pb.LabelVMRequest(scope="acme", name="a", set={"role": "db"})
    c = await race(api, vm("c", role="db"), lambda: api.vm.LabelVM(relabel), "dbs")
    assert c.status.host == "h1"
