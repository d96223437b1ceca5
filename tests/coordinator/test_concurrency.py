"""Concurrent creates never break a required anti-affinity rule, even through two
coordinators' API backends racing on the same etcd (the optimistic, revision-compared commit)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import grpc
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc
from support.api import running_api
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
