"""What the seeds' rules still missed, through the real API and etcd (issue 12 item 4):
max_members, one rule of each polarity per VM on create, a required affinity's members
of one request placed all or none, host labels with the rules re-checked, and the
rebalance preview (no agents needed: nothing moves)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from hvplace.proto import codec, keyspace
from hvplace.proto.records import Rule, RuleKind
from hvplace.proto.v1 import hvplace_pb2 as pb
from support.api import Api, running_api
from support.etcd import EtcdServer

IMAGE = pb.Image(kernel="/boot/k", initrd="/boot/i")


@pytest.fixture
async def api(etcd: EtcdServer) -> AsyncIterator[Api]:
    async with running_api(etcd) as a:
        yield a


def vm(name: str, memory_mib: int = 512, node: str = "", **labels: str) -> pb.VM:
    spec = pb.VM(scope="acme", name=name, labels=labels)
    spec.resources.CopyFrom(pb.Resources(vcpus=1, memory_mib=memory_mib))
    spec.image.CopyFrom(IMAGE)
    if node:
        term = spec.node_affinity.required.add()
        term.match_expressions.add(key="host", operator="In", values=[node])
    return spec


async def create(api: Api, *vms: pb.VM, atomic: bool = False) -> pb.CreateVMsResponse:
    resp: pb.CreateVMsResponse = await api.vm.CreateVMs(
        pb.CreateVMsRequest(vms=list(vms), atomic=atomic)
    )
    return resp


def rule(name: str, kind: str = "anti_affinity", **kw: object) -> pb.Rule:
    return pb.Rule(scope="acme", name=name, kind=kind, enforcement="required", **kw)  # type: ignore[arg-type]


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call  # type: ignore[misc]
    return e.value


async def test_max_members_refuses_the_next_member_as_incorrect(api: Api) -> None:
    await api.add_host("hv1")
    await api.add_host("hv2")
    await api.add_host("hv3")
    sel = pb.LabelSelector(match_labels={"group": "g"})
    await api.rule.CreateRule(
        pb.CreateRuleRequest(rule=rule("capped", selector=sel, max_members=2))
    )
    await api.backend.fresh_view()
    await create(api, vm("a", group="g"), vm("b", group="g"))
    before = api.key_count()
    err = await refused(create(api, vm("c", group="g")))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_members" in (err.details() or "") and "acme/c" in (err.details() or "")
    assert api.key_count() == before  # nothing written
    # A VM outside the rule is not capped; a named rule over its cap is refused too.
    await create(api, vm("d"))
    err = await refused(
        api.rule.CreateRule(
            pb.CreateRuleRequest(rule=rule("named", members=["x", "y", "z"], max_members=2))
        )
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_vm_joining_two_anti_affinity_rules_on_create_is_a_conflict(api: Api) -> None:
    await api.add_host("hv1")
    await api.add_host("hv2")
    await api.rule.CreateRule(
        pb.CreateRuleRequest(
            rule=rule("dbs", selector=pb.LabelSelector(match_labels={"role": "db"}))
        )
    )
    await api.rule.CreateRule(
        pb.CreateRuleRequest(
            rule=rule("east", selector=pb.LabelSelector(match_labels={"site": "east"}))
        )
    )
    await create(api, vm("a", role="db"), vm("b", site="east"))
    before = api.key_count()
    err = await refused(create(api, vm("c", role="db", site="east")))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert "acme/c" in details and "`dbs`" in details and "`east`" in details
    assert api.key_count() == before
    # One of each polarity is fine.
    await api.rule.CreateRule(
        pb.CreateRuleRequest(
            rule=rule("pair", kind="affinity", selector=pb.LabelSelector(match_labels={"app": "x"}))
        )
    )
    await create(api, vm("e", role="db", app="x"))


async def test_required_affinity_members_of_one_request_are_placed_all_or_none(api: Api) -> None:
    # Each host fits two of the three members: no host can hold the rule's three.
    await api.add_host("hv1", memory_mib=1024)
    await api.add_host("hv2", memory_mib=1024)
    await api.backend.fresh_view()
    await api.rule.CreateRule(
        pb.CreateRuleRequest(rule=rule("trio", kind="affinity", members=["a", "b", "c"]))
    )
    resp = await create(api, vm("a"), vm("b"), vm("c"), vm("other"))
    phases = {v.spec.name: v.status.phase for v in resp.vms}
    assert phases == {"a": "pending", "b": "pending", "c": "pending", "other": "scheduled"}
    held = [v for v in resp.vms if v.spec.name != "other" and "held back" in v.status.reason]
    assert held and "trio" in held[0].status.reason
    view = api.backend.view()
    assert not any(k.startswith("acme/") and k != "acme/other" for k in view.assignments)


async def test_host_label_rechecks_required_rules(api: Api) -> None:
    for h in ("hv1", "hv2", "hv3"):
        await api.add_host(h)
    for h, rack in (("hv1", "r1"), ("hv2", "r2"), ("hv3", "r3")):
        await api.host.LabelHost(pb.LabelHostRequest(name=h, set={"rack": rack}))
    view: pb.HostView = await api.host.GetHost(pb.HostRef(name="hv2"))
    assert dict(view.status.labels) == {"rack": "r2"}
    await create(api, vm("a", node="hv1"), vm("b", node="hv2"))
    await api.rule.CreateRule(
        pb.CreateRuleRequest(rule=rule("racks", members=["a", "b"], topology_key="rack"))
    )
    revision = api.backend.view().revision
    # hv2 into rack r1 would put both members in one rack.
    err = await refused(api.host.LabelHost(pb.LabelHostRequest(name="hv2", set={"rack": "r1"})))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "acme/racks" in (err.details() or "") and "rebalance" in (err.details() or "")
    await api.backend.fresh_view()
    assert api.backend.view().revision == revision  # nothing written
    # hv3 (no member) may join r1; the engine then sees it there.
    await api.host.LabelHost(pb.LabelHostRequest(name="hv3", set={"rack": "r1", "zone": "z"}))
    await api.backend.fresh_view()
    assert api.backend.view().snapshot.hosts["hv3"].labels["rack"] == "r1"
    await api.host.LabelHost(pb.LabelHostRequest(name="hv3", remove=["zone"]))
    err = await refused(api.host.LabelHost(pb.LabelHostRequest(name="hv3", remove=["nope"])))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    err = await refused(api.host.LabelHost(pb.LabelHostRequest(name="hv3", set={"bad key": "x"})))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    err = await refused(api.host.LabelHost(pb.LabelHostRequest(name="ghost", set={"a": "b"})))
    assert err.code() is grpc.StatusCode.NOT_FOUND


async def test_preview_lists_the_fewest_moves_and_changes_nothing(
    api: Api, etcd: EtcdServer
) -> None:
    await api.add_host("hv1")
    await api.backend.fresh_view()  # the cache has seen hv1 before the create places
    await create(api, vm("a"), vm("b"), vm("c"), vm("d"))  # all on hv1, the only host
    await api.add_host("hv2")
    await api.add_host("hv3")
    # The rule written past the API, as a failover under on_failure=degrade leaves it.
    broken = Rule(scope="acme", name="spread", kind=RuleKind.ANTI_AFFINITY, members=("a", "b", "c"))
    etcd.etcdctl("put", keyspace.rule("acme", "spread"), codec.dumps(broken).decode())
    await api.backend.fresh_view()
    revision = api.backend.view().revision
    resp: pb.RebalanceResponse = await api.cluster.PreviewRebalance(pb.RebalanceRequest())
    assert resp.minimal and resp.repair_moves == 2 and list(resp.broken) == ["acme/spread"]
    assert len({m.vm for m in resp.moves}) == 2
    assert {m.vm for m in resp.moves} <= {"acme/a", "acme/b", "acme/c"}
    assert {m.target for m in resp.moves} == {"hv2", "hv3"} and not resp.applied
    capped: pb.RebalanceResponse = await api.cluster.PreviewRebalance(
        pb.RebalanceRequest(max_moves=1)
    )
    assert len(capped.moves) == 1 and capped.truncated == 1
    await api.backend.fresh_view()
    assert api.backend.view().revision == revision
    err = await refused(api.cluster.PreviewRebalance(pb.RebalanceRequest(max_moves=-1)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_vm_label_change_is_checked_like_a_create_and_where_it_runs(api: Api) -> None:
    for h in ("hv1", "hv2"):
        await api.add_host(h)
    await api.backend.fresh_view()
    sel = {"dbs": {"role": "db"}, "east": {"site": "east"}}
    for name, labels in sel.items():
        await api.rule.CreateRule(
            pb.CreateRuleRequest(
                rule=rule(name, selector=pb.LabelSelector(match_labels=labels), max_members=2)
            )
        )
    await create(api, vm("a", node="hv1", role="db"), vm("b", node="hv1"), vm("c", node="hv2"))
    before = api.key_count()
    revision = (await api.backend.fresh_view()).revision
    # b would join `dbs` beside a on hv1: the rule would break where they run.
    err = await refused(
        api.vm.LabelVM(pb.LabelVMRequest(scope="acme", name="b", set={"role": "db"}))
    )
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "acme/dbs" in (err.details() or "")
    # a would be in two anti-affinity rules.
    err = await refused(
        api.vm.LabelVM(pb.LabelVMRequest(scope="acme", name="a", set={"site": "east"}))
    )
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "`east`" in (err.details() or "")
    assert (await api.backend.fresh_view()).revision == revision and api.key_count() == before
    # c on hv2 may join `dbs`; the spec and its assignment's copy both change.
    view = await api.vm.LabelVM(pb.LabelVMRequest(scope="acme", name="c", set={"role": "db"}))
    assert dict(view.spec.labels) == {"role": "db"}
    fresh = await api.backend.fresh_view()
    assert fresh.assignments["acme/c"].vm.labels == {"role": "db"}
    # `dbs` holds two members now (max_members 2): a third is refused as incorrect.
    err = await refused(
        api.vm.LabelVM(pb.LabelVMRequest(scope="acme", name="b", set={"role": "db"}))
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "max_members" in (err.details() or "")
    await api.vm.LabelVM(pb.LabelVMRequest(scope="acme", name="c", remove=["role"]))
    err = await refused(api.vm.LabelVM(pb.LabelVMRequest(scope="acme", name="c", remove=["x"])))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
