"""The gRPC API against a real etcd: CRUD, error statuses, idempotency, malformed input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hvplace.coordinator.convert import to_proto
from hvplace.coordinator.errors_grpc import error_info
from hvplace.coordinator.planner import MAX_TXN_VMS
from hvplace.coordinator.snapshot import Snapshot
from hvplace.proto import codec, keyspace, records
from hvplace.proto.records import AdmissionPolicy
from hvplace.proto.v1 import hvplace_pb2 as pb
from support.api import Api, running_api
from support.etcd import EtcdServer
from support.wait import eventually


@pytest.fixture
async def api(etcd: EtcdServer) -> AsyncIterator[Api]:
    async with running_api(etcd) as a:
        yield a


def vm(name: str, scope: str = "acme", **labels: str) -> pb.VM:
    return pb.VM(
        scope=scope,
        name=name,
        labels=labels,
        resources=pb.Resources(vcpus=1, memory_mib=512),
        image=pb.Image(kernel="/var/cache/hvplace/guest/vmlinuz"),
    )


async def expect_error(call: object, code: grpc.StatusCode, reason: str) -> str:
    """Await a failing call; check the status code, the reason word in the message and
    in the ErrorInfo detail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    err = info.value
    assert err.code() == code, err.details()
    assert (err.details() or "").startswith(f"{reason}: "), err.details()
    detail = error_info(err)
    assert detail is not None and detail.reason == reason and detail.domain == "hvplace"
    return err.details() or ""


async def test_vm_crud_and_records_readable_with_etcdctl(api: Api) -> None:
    for name in ("hv1", "hv2", "hv3"):
        await api.add_host(name, {"rack": "r1" if name != "hv3" else "r2"})
    resp = await api.vm.CreateVMs(pb.CreateVMsRequest(request_id="req-1", vms=[vm("a"), vm("b")]))
    assert [v.status.phase for v in resp.vms] == ["scheduled", "scheduled"]
    assert resp.admission.ok
    stored = json.loads(api.etcd.etcdctl("get", "--print-value-only", "/hvplace/v1/vms/acme/a"))
    assert stored["name"] == "a" and stored["resources"]["memory_mib"] == 512
    host = resp.vms[0].status.host
    assignment = api.etcd.etcdctl(
        "get", "--print-value-only", f"/hvplace/v1/assignments/{host}/acme/a"
    )
    assert json.loads(assignment)["host"] == host

    got = await api.vm.GetVM(pb.VMRef(scope="acme", name="a"))
    assert got.status.host == host and got.spec.uid
    listed = await api.vm.ListVMs(pb.ListVMsRequest(scope="acme"))
    assert [v.spec.name for v in listed.vms] == ["a", "b"]
    stopped = await api.vm.StopVM(pb.VMRef(scope="acme", name="a"))
    assert stopped.spec.power == "stopped"
    assignment = api.etcd.etcdctl(
        "get", "--print-value-only", f"/hvplace/v1/assignments/{host}/acme/a"
    )
    assert json.loads(assignment)["vm"]["power"] == "stopped"
    started = await api.vm.StartVM(pb.VMRef(scope="acme", name="a"))
    assert started.spec.power == "running"
    why = await api.vm.ExplainVM(pb.VMRef(scope="acme", name="a"))
    assert why.total_hosts == 3

    await api.vm.DeleteVM(pb.DeleteVMRequest(scope="acme", name="b"))
    assert (
        api.etcd.etcdctl("get", "--prefix", "--keys-only", "/hvplace/v1/vms/acme/b").strip() == ""
    )
    await expect_error(
        api.vm.GetVM(pb.VMRef(scope="acme", name="b")), grpc.StatusCode.NOT_FOUND, "not-found"
    )


async def test_rules_policies_hosts_cluster(api: Api) -> None:
    for name in ("hv1", "hv2", "hv3"):
        await api.add_host(name, {"rack": "r1" if name != "hv3" else "r2"})
    rule = pb.Rule(
        scope="acme",
        name="db",
        kind="anti_affinity",
        enforcement="required",
        selector=pb.LabelSelector(match_labels={"app": "db"}),
        topology_key="host",
        max_per_domain=1,
    )
    created = await api.rule.CreateRule(pb.CreateRuleRequest(request_id="r-1", rule=rule))
    assert created.rule.rule.name == "db" and created.rule.satisfied
    resp = await api.vm.CreateVMs(
        pb.CreateVMsRequest(vms=[vm(f"db{i}", app="db") for i in range(3)])
    )
    assert len({v.status.host for v in resp.vms}) == 3
    # A fourth replica fits nowhere: pending with the reason, not an error.
    extra = await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("db3", app="db")]))
    assert extra.vms[0].status.phase == "pending"
    assert "anti-affinity" in extra.vms[0].status.reason
    view = await api.rule.GetRule(pb.RuleRef(scope="acme", name="db"))
    assert {m.name for m in view.members} == {"db0", "db1", "db2", "db3"}
    assert {m.host for m in view.members if m.phase == "scheduled"} == {"hv1", "hv2", "hv3"}
    listed = await api.rule.ListRules(pb.ListRulesRequest(scope="acme"))
    assert [r.rule.name for r in listed.rules] == ["db"]

    # Atomic batch that cannot fully place writes nothing.
    before = api.key_count()
    await expect_error(
        api.vm.CreateVMs(pb.CreateVMsRequest(atomic=True, vms=[vm("db4", app="db"), vm("ok1")])),
        grpc.StatusCode.UNAVAILABLE,
        "unavailable",
    )
    assert api.key_count() == before

    # Update: a change that running members break is refused.
    broken = pb.Rule()
    broken.CopyFrom(rule)
    broken.topology_key = "rack"
    await expect_error(
        api.rule.UpdateRule(pb.UpdateRuleRequest(rule=broken)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "conflict",
    )
    relaxed = pb.Rule()
    relaxed.CopyFrom(rule)
    relaxed.description = "replicas apart"
    updated = await api.rule.UpdateRule(pb.UpdateRuleRequest(rule=relaxed))
    assert updated.rule.rule.description == "replicas apart"
    await expect_error(  # rebalancing does not make an existing rule new
        api.rule.CreateRule(pb.CreateRuleRequest(rule=rule, rebalance=True)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "conflict",
    )
    msg = await expect_error(
        api.rule.DeleteRule(pb.DeleteRuleRequest(scope="acme", name="db")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "conflict",
    )
    assert "member(s)" in msg
    await api.rule.DeleteRule(pb.DeleteRuleRequest(scope="acme", name="db", force=True))

    policy = await api.rule.SetScopePolicy(pb.ScopePolicy(scope="web", label_anti_affinity=True))
    assert policy.label_anti_affinity
    got = await api.rule.GetScopePolicy(pb.ScopeRef(scope="web"))
    assert got.label_anti_affinity

    cordoned = await api.host.CordonHost(pb.HostRef(name="hv1"))
    assert cordoned.status.state == "cordoned"
    hosts = await api.host.ListHosts(pb.Empty())
    assert [h.info.name for h in hosts.hosts] == ["hv1", "hv2", "hv3"]
    assert all(h.alive for h in hosts.hosts)
    drained = await api.host.DrainHost(pb.HostRef(name="hv2"))
    assert drained.status.state == "draining" and "moves its VMs away" in drained.status.reason
    ready = await api.host.UncordonHost(pb.HostRef(name="hv1"))
    assert ready.status.state == "ready"
    await expect_error(
        api.host.GetHost(pb.HostRef(name="nope")), grpc.StatusCode.NOT_FOUND, "not-found"
    )

    status = await api.cluster.GetClusterStatus(pb.Empty())
    assert status.hosts_by_state["ready"] == 2 and status.vms_by_phase["pending"] == 1
    sim = await api.cluster.Simulate(pb.SimulateRequest(fail_hosts=["hv3"]))
    host_of = {v.spec.name: v.status.host for v in resp.vms}
    lost = next(n for n, h in host_of.items() if h == "hv3")
    # The rule was force-deleted, so the lost VM moves; simulate changed nothing.
    assert [(m.vm, m.from_host) for m in sim.moves] == [(f"acme/{lost}", "hv3")]
    assert (await api.vm.GetVM(pb.VMRef(scope="acme", name=lost))).status.host == "hv3"


DB_RULE = pb.Rule(
    scope="acme",
    name="db",
    kind="anti_affinity",
    enforcement="required",
    selector=pb.LabelSelector(match_labels={"app": "db"}),
    topology_key="host",
    max_per_domain=1,
)


async def test_failover_admission_refuses_a_create_that_strands_a_member(api: Api) -> None:
    """SPEC §5.1 through the API (admission runs inside the planner's commit attempt, on
    its own placement): under `refuse`, a create after which losing some host leaves a
    required rule's member nowhere to go is refused and writes nothing; a create that
    strands nothing passes; under `warn` the same create is accepted, with the warning."""
    for name in ("hv1", "hv2", "hv3"):
        await api.add_host(name)
    await api.rule.CreateRule(pb.CreateRuleRequest(rule=DB_RULE))
    await api.set_admission_policy(AdmissionPolicy.REFUSE)
    two = await api.vm.CreateVMs(
        pb.CreateVMsRequest(vms=[vm("db0", app="db"), vm("db1", app="db")])
    )
    assert two.admission.ok and two.admission.policy == "refuse"
    assert [v.status.phase for v in two.vms] == ["scheduled", "scheduled"]

    # A third member leaves every host holding one: losing any host strands its member.
    # The whole request is refused, the VM beside it included.
    before = api.key_count()
    msg = await expect_error(
        api.vm.CreateVMs(
            pb.CreateVMsRequest(request_id="third", vms=[vm("db2", app="db"), vm("w")])
        ),
        grpc.StatusCode.UNAVAILABLE,
        "unavailable",
    )
    assert "refused by failover admission (policy refuse)" in msg, msg
    assert "strands `acme/db" in msg, msg
    assert api.key_count() == before  # no VM, status, assignment or request record

    plain = await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("w")]))
    assert plain.admission.ok and plain.vms[0].status.phase == "scheduled"

    await api.set_admission_policy(AdmissionPolicy.WARN)
    warned = await api.vm.CreateVMs(
        pb.CreateVMsRequest(request_id="third", vms=[vm("db2", app="db")])
    )
    assert warned.vms[0].status.phase == "scheduled"
    assert not warned.admission.ok and warned.admission.policy == "warn"
    assert {i.failed for i in warned.admission.impacts} == {"hv1", "hv2", "hv3"}
    assert all("would strand `acme/db" in w for w in warned.admission.warnings)


async def test_admission_counts_a_create_still_committing(etcd: EtcdServer) -> None:
    """Under a fence the planner computes the next plan while one commits. Two creates
    that each pass admission alone but not together: the second is checked with the
    first's placements laid over the snapshot, so one is refused, whichever it is."""
    async with running_api(etcd, fenced=True) as api:
        for name in ("hv1", "hv2", "hv3"):
            await api.add_host(name)
        await api.rule.CreateRule(pb.CreateRuleRequest(rule=DB_RULE))
        await api.set_admission_policy(AdmissionPolicy.REFUSE)
        await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("db0", app="db")]))

        planner, store = api.backend.planner, api.backend.store
        in_flight: list[int] = []  # plans still committing, seen by each plan computed
        real_snapshot, real_commit = planner._snapshot, store.commit

        def snapshot() -> Snapshot:
            in_flight.append(len(planner._inflight))
            return real_snapshot()

        async def gated_commit(*args: Any, **kwargs: Any) -> int:
            # Held until the other create has computed its plan: they overlap for sure.
            await eventually(lambda: len(in_flight) >= 2)
            return await real_commit(*args, **kwargs)

        planner._snapshot = snapshot  # type: ignore[method-assign]
        store.commit = gated_commit  # type: ignore[method-assign]
        results = await asyncio.gather(
            *(
                api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm(name, app="db")]))
                for name in ("db1", "db2")
            ),
            return_exceptions=True,
        )
        assert in_flight == [0, 1]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        created = [r for r in results if isinstance(r, pb.CreateVMsResponse)]
        assert len(refused) == 1 and len(created) == 1, results
        assert refused[0].code() == grpc.StatusCode.UNAVAILABLE
        assert "refused by failover admission" in (refused[0].details() or "")
        assert created[0].admission.ok
        stored = api.etcd.etcdctl("get", "--prefix", "--keys-only", "/hvplace/v1/vms/acme/")
        names = sorted(line.rsplit("/", 1)[1] for line in stored.split() if line)
        assert names == ["db0", created[0].vms[0].spec.name]


async def test_create_replies_with_what_etcd_holds(api: Api) -> None:
    """A create's reply is built from what was committed: each VM's spec and status equal
    the records etcd holds (the epoch, the time, a pending VM's explanation), read back
    with etcdctl; a replay of the request answers the same."""
    await api.add_host("hv1")
    spread = pb.Rule(
        scope="acme",
        name="spread",
        kind="anti_affinity",
        enforcement="required",
        selector=pb.LabelSelector(match_labels={"app": "web"}),
        topology_key="host",
        max_per_domain=1,
    )
    await api.rule.CreateRule(pb.CreateRuleRequest(rule=spread))
    request = pb.CreateVMsRequest(request_id="r1", vms=[vm("w1", app="web"), vm("w2", app="web")])
    resp = await api.vm.CreateVMs(request)

    def stored(key: str, record: type[Any], msg: type[Any]) -> Any:
        """The record etcd holds, as the API would send it."""
        raw = api.etcd.etcdctl("get", "--print-value-only", key)
        return to_proto(codec.loads(record, raw.strip().encode()), msg)

    for got in resp.vms:
        name = got.spec.name
        assert got.spec == stored(keyspace.vm("acme", name), records.VM, pb.VM)
        assert got.status == stored(keyspace.vm_status("acme", name), records.VMStatus, pb.VMStatus)
        assert got.status.since > 0
    placed, pending = resp.vms  # one per host: w2 cannot be placed
    assert (placed.status.phase, placed.status.host, placed.status.epoch) == ("scheduled", "hv1", 1)
    assert pending.status.phase == "pending" and pending.status.explanation.reasons
    replayed = await api.vm.CreateVMs(request)
    assert [v.spec for v in replayed.vms] == [v.spec for v in resp.vms]
    assert [v.status for v in replayed.vms] == [v.status for v in resp.vms]


async def test_a_non_atomic_create_larger_than_one_transaction(api: Api) -> None:
    """More VMs than one etcd transaction holds (planner.MAX_TXN_VMS) are committed in
    parts, each under the request's preconditions (was: an internal error)."""
    await api.add_hosts(40)
    count = MAX_TXN_VMS + 1
    request = pb.CreateVMsRequest(request_id="big", vms=[vm(f"v{i:04d}") for i in range(count)])
    resp = await api.vm.CreateVMs(request)
    assert len(resp.vms) == count and {v.status.phase for v in resp.vms} == {"scheduled"}
    assert all(v.status.epoch == 1 for v in resp.vms)
    stored = api.etcd.etcdctl("get", "--prefix", "--keys-only", keyspace.ASSIGNMENTS)
    assert len([line for line in stored.splitlines() if line.strip()]) == count
    replayed = await api.vm.CreateVMs(request)
    assert [v.spec.uid for v in replayed.vms] == [v.spec.uid for v in resp.vms]


async def test_idempotent_create_by_request_id(api: Api) -> None:
    await api.add_host("hv1")
    request = pb.CreateVMsRequest(request_id="same", vms=[vm("x")])
    first = await api.vm.CreateVMs(request)
    again = await api.vm.CreateVMs(request)
    assert again.vms[0].spec.uid == first.vms[0].spec.uid
    keys = api.etcd.etcdctl("get", "--prefix", "--keys-only", "/hvplace/v1/vms/").split()
    assert keys == ["/hvplace/v1/vms/acme/x"]
    other = pb.CreateVMsRequest(request_id="same", vms=[vm("y")])
    await expect_error(api.vm.CreateVMs(other), grpc.StatusCode.FAILED_PRECONDITION, "conflict")
    await expect_error(
        api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("x")])),
        grpc.StatusCode.FAILED_PRECONDITION,
        "conflict",
    )
    record = json.loads(api.etcd.etcdctl("get", "--print-value-only", "/hvplace/v1/requests/same"))
    assert record["targets"] == ["acme/x"]


BAD_VMS = [
    pb.VM(scope="acme", name="a/b", resources=pb.Resources(vcpus=1, memory_mib=64)),
    pb.VM(scope="acme", name="..", resources=pb.Resources(vcpus=1, memory_mib=64)),
    pb.VM(scope="acme", name="a\x01b", resources=pb.Resources(vcpus=1, memory_mib=64)),
    pb.VM(scope="acme", name="x" * 64, resources=pb.Resources(vcpus=1, memory_mib=64)),
    pb.VM(scope="ac/me", name="ok", resources=pb.Resources(vcpus=1, memory_mib=64)),
    pb.VM(scope="acme", name="zero", resources=pb.Resources(vcpus=0, memory_mib=64)),
    pb.VM(scope="acme", name="neg", resources=pb.Resources(vcpus=1, memory_mib=-5)),
    pb.VM(scope="acme", name="huge", resources=pb.Resources(vcpus=1, memory_mib=1 << 50)),
    pb.VM(scope="acme", name="disk", resources=pb.Resources(vcpus=1, memory_mib=64, disk_gib=-1)),
]
BAD_RULES = [
    pb.Rule(scope="acme", name="one", kind="anti_affinity", members=["a"]),
    pb.Rule(scope="acme", name="bad/name", kind="anti_affinity", members=["a", "b"]),
    pb.Rule(scope="acme", name="k", kind="sideways", members=["a", "b"]),
    pb.Rule(
        scope="acme",
        name="w",
        kind="affinity",
        enforcement="preferred",
        weight=101,
        members=["a", "b"],
    ),
    pb.Rule(scope="acme", name="m", kind="anti_affinity", members=["a", "a"]),
    pb.Rule(scope="acme", name="x" * 41, kind="anti_affinity", members=["a", "b"]),
]


async def test_malformed_input_is_incorrect_and_writes_nothing(api: Api) -> None:
    await api.add_host("hv1")
    await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("good")]))
    before = api.key_count()
    for bad in BAD_VMS:
        await expect_error(
            api.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("fine"), bad])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "incorrect",
        )
    for rule in BAD_RULES:
        await expect_error(
            api.rule.CreateRule(pb.CreateRuleRequest(rule=rule)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "incorrect",
        )
    await expect_error(
        api.vm.CreateVMs(pb.CreateVMsRequest(request_id="a/b", vms=[vm("fine")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "incorrect",
    )
    await expect_error(
        api.vm.GetVM(pb.VMRef(scope="acme", name="../etc")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "incorrect",
    )
    await expect_error(
        api.host.CordonHost(pb.HostRef(name="hv1\n")), grpc.StatusCode.INVALID_ARGUMENT, "incorrect"
    )
    await expect_error(
        api.cluster.Simulate(pb.SimulateRequest()), grpc.StatusCode.INVALID_ARGUMENT, "incorrect"
    )
    assert api.key_count() == before


async def test_health_and_reflection(api: Api) -> None:
    stub = health_pb2_grpc.HealthStub(api.channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service="hvplace.v1.VMService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(api.channel)

    async def one() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = []
    async for r in refl.ServerReflectionInfo(one()):
        names = [s.name for s in r.list_services_response.service]
    assert "hvplace.v1.VMService" in names and "grpc.health.v1.Health" in names


async def test_standby_answers_writes_with_unavailable(etcd: EtcdServer) -> None:
    from hvplace.coordinator.operations.backend import Leadership

    async with running_api(etcd) as a:
        a.backend.leadership = lambda: Leadership(is_leader=False, leader="coord-2")  # type: ignore[method-assign]
        msg = await expect_error(
            a.vm.CreateVMs(pb.CreateVMsRequest(vms=[vm("x")])),
            grpc.StatusCode.UNAVAILABLE,
            "unavailable",
        )
        assert "not the leader; leader is coord-2" in msg
        assert (await a.vm.ListVMs(pb.ListVMsRequest())).vms == []
