"""Concurrent creates never break a required anti-affinity rule, even through two
coordinators' API backends racing on the same etcd (the optimistic, revision-compared commit);
a record change racing another writer re-runs on the fresh record and loses no update."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from hvplace.proto import codec, keyspace, records
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc
from support.api import Api, running_api
from support.etcd import EtcdServer

CLIENTS = 20
VMS = 100
HOSTS = 100


async def test_twenty_clients_one_anti_affinity_group(etcd: EtcdServer) -> None:
    async with running_api(etcd) as a, running_api(etcd) as b:
        await a.add_hosts(HOSTS)
        await b.backend.fresh_view()
        await a.rule.CreateRule(
            pb.CreateRuleRequest(
                rule=pb.Rule(
                    scope="t",
                    name="spread",
                    kind="anti_affinity",
                    selector=pb.LabelSelector(match_labels={"app": "web"}),
                )
            )
        )
        await b.backend.fresh_view()
        stubs = [pb_grpc.VMServiceStub(x.channel) for x in (a, b)]

        async def client(i: int) -> None:
            stub = stubs[i % 2]
            for j in range(VMS // CLIENTS):
                name = f"web-{i:02d}-{j}"
                await create(stub, name)

        async def create(stub: pb_grpc.VMServiceStub, name: str) -> None:
            # `busy` (ABORTED) means nothing was written: retry with the same request id.
            for _attempt in range(20):
                try:
                    await stub.CreateVMs(
                        pb.CreateVMsRequest(
                            request_id=f"req-{name}",
                            vms=[
                                pb.VM(
                                    scope="t",
                                    name=name,
                                    labels={"app": "web"},
                                    resources=pb.Resources(vcpus=1, memory_mib=256),
                                    image=pb.Image(kernel="/boot/vmlinuz"),
                                )
                            ],
                        )
                    )
                    return
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.ABORTED:
                        raise
            raise AssertionError(f"{name} stayed busy")

        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        out = etcd.etcdctl("get", "--prefix", "--keys-only", "/hvplace/v1/assignments/")
        hosts = Counter(key.split("/")[4] for key in out.split())
        assert sum(hosts.values()) == VMS
        assert max(hosts.values()) == 1, hosts.most_common(3)
        vms = etcd.etcdctl("get", "--prefix", "--print-value-only", "/hvplace/v1/vmstatus/")
        phases = Counter(json.loads(line)["phase"] for line in vms.split())
        assert phases == {"scheduled": VMS}


def race_first_commit(api: Api, meddle: Callable[[], Awaitable[None]]) -> list[int]:
    """Another writer writes (`meddle`) between the API's reads and its first commit;
    returns the list that counts the commits tried."""
    store = api.backend.store
    real = store.commit
    tried: list[int] = []

    async def commit(*args: Any, **kwargs: Any) -> int:
        if not tried:
            await meddle()
        tried.append(1)
        return await real(*args, **kwargs)

    store.commit = commit  # type: ignore[method-assign]
    return tried


async def test_a_change_racing_another_writer_is_decided_again(etcd: EtcdServer) -> None:
    """The one read-modify-write: a rule update whose rule changed under it re-runs and
    applies (was `busy` at once); a stop whose VM spec changed under it re-reads the
    spec and keeps the other writer's change (no lost update)."""
    async with running_api(etcd) as api:
        await api.add_host("hv1")
        rule = pb.Rule(
            scope="t",
            name="r",
            kind="anti_affinity",
            enforcement="required",
            selector=pb.LabelSelector(match_labels={"app": "web"}),
            description="first",
        )
        await api.rule.CreateRule(pb.CreateRuleRequest(rule=rule))
        key = keyspace.rule("t", "r")

        async def other_rule_writer() -> None:
            raw = (await api.client.get(key.encode())).value
            theirs = json.loads(raw) | {"description": "theirs"}
            await api.client.put(key.encode(), json.dumps(theirs).encode())

        tried = race_first_commit(api, other_rule_writer)
        rule.description = "mine"
        updated = await api.rule.UpdateRule(pb.UpdateRuleRequest(rule=rule))
        assert updated.rule.rule.description == "mine" and len(tried) == 2
        stored = json.loads(etcd.etcdctl("get", "--print-value-only", key))
        assert stored["description"] == "mine"

        await api.vm.CreateVMs(
            pb.CreateVMsRequest(
                vms=[
                    pb.VM(
                        scope="t",
                        name="a",
                        resources=pb.Resources(vcpus=1, memory_mib=256),
                        image=pb.Image(kernel="/boot/vmlinuz"),
                    )
                ]
            )
        )
        vm_key = keyspace.vm("t", "a")

        async def other_spec_writer() -> None:
            vm = codec.loads(records.VM, (await api.client.get(vm_key.encode())).value)
            vm = dataclasses.replace(vm, labels={"tier": "gold"})
            await api.client.put(vm_key.encode(), codec.dumps(vm))

        tried = race_first_commit(api, other_spec_writer)
        stopped = await api.vm.StopVM(pb.VMRef(scope="t", name="a"))
        assert len(tried) == 2
        assert stopped.spec.power == "stopped" and dict(stopped.spec.labels) == {"tier": "gold"}
        spec = json.loads(etcd.etcdctl("get", "--print-value-only", vm_key))
        assert spec["power"] == "stopped" and spec["labels"] == {"tier": "gold"}
