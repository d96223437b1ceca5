"""A real coordinator API in-process for tests, assembled as the daemon assembles it
(daemon.api_core: planner, backend, Operations) over a store and cache: standalone (no
election, so every commit compares the assignments it read) or `fenced` (holding a
leader key as an elected coordinator does, so the planner pipelines its commits); gRPC
on a free port. Hosts are played by writing HostInfo records under leases, as agents do."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aetcd
import grpc
from hvplace.coordinator.api import ApiServer, start_api_server
from hvplace.coordinator.backend import CoreBackend
from hvplace.coordinator.cache import Cache
from hvplace.coordinator.daemon import api_core
from hvplace.coordinator.moves import ColdMover
from hvplace.coordinator.store import Fence, Store
from hvplace.proto import codec, keyspace
from hvplace.proto.records import AdmissionPolicy, ClusterConfig, HostInfo, Resources
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc

from support.etcd import EtcdServer


@dataclass
class Api:
    etcd: EtcdServer
    client: aetcd.Client
    backend: CoreBackend
    server: ApiServer
    channel: grpc.aio.Channel
    vm: pb_grpc.VMServiceStub
    rule: pb_grpc.RuleServiceStub
    host: pb_grpc.HostServiceStub
    cluster: pb_grpc.ClusterServiceStub
    image: pb_grpc.ImageServiceStub

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def add_host(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        vcpus: int = 16,
        memory_mib: int = 32768,
        lease_ttl: int = 60,
    ) -> None:
        """Register a host as its agent would: HostInfo under the agent's lease."""
        info = HostInfo(
            name=name,
            labels=dict(labels or {}),
            capacity=Resources(vcpus=vcpus, memory_mib=memory_mib, disk_gib=1000),
            domain_type="test",
        )
        lease = await self.client.lease(lease_ttl)
        await self.client.put(keyspace.host(name).encode(), codec.dumps(info), lease=lease)

    async def add_hosts(self, count: int, prefix: str = "hv", **kw: int) -> None:
        lease = await self.client.lease(60)
        t = self.client.transactions
        names = [f"{prefix}{i:03d}" for i in range(count)]
        for start in range(0, count, 100):
            ops = []
            for name in names[start : start + 100]:
                info = HostInfo(
                    name=name,
                    capacity=Resources(
                        vcpus=kw.get("vcpus", 16),
                        memory_mib=kw.get("memory_mib", 32768),
                        disk_gib=1000,
                    ),
                    domain_type="test",
                )
                ops.append(t.put(keyspace.host(name).encode(), codec.dumps(info), lease=lease))
            await self.client.transaction(compare=[], success=ops, failure=[])
        await self.backend.fresh_view()

    async def set_admission_policy(self, policy: AdmissionPolicy) -> None:
        """Write the cluster config record (as the leader does from its config file)."""
        await self.client.put(
            keyspace.CONFIG.encode(), codec.dumps(ClusterConfig(admission_policy=policy))
        )
        await self.backend.fresh_view()

    def key_count(self) -> int:
        out = self.etcd.etcdctl("get", "--prefix", "--keys-only", keyspace.ROOT)
        return len([line for line in out.splitlines() if line.strip()])


@asynccontextmanager
async def running_api(
    etcd: EtcdServer, fenced: bool = False, stop_timeout_s: float = 30.0
) -> AsyncIterator[Api]:
    """`stop_timeout_s`: how long the API's cold mover (rebalance) waits for a host to
    report a VM stopped."""
    client = aetcd.Client(host="127.0.0.1", port=etcd.client_port)
    await client.connect()
    store = await Store.connect([f"127.0.0.1:{etcd.client_port}"], timeout=5.0)
    cache = Cache(store)
    await cache.start()
    fence: Fence | None = None
    lease = 0
    if fenced:
        key, lease = keyspace.ELECTION + "api-test", await store.grant(60)
        fence = Fence(key, await store.put(key, b"api-test", lease=lease))
    core = api_core(
        store,
        cache,
        fence=lambda: fence,
        mover=lambda planner: ColdMover(store, cache, planner, stop_timeout_s=stop_timeout_s),
    )
    backend = core.backend
    server = await start_api_server(core.operations, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Api(
            etcd=etcd,
            client=client,
            backend=backend,
            server=server,
            channel=channel,
            vm=pb_grpc.VMServiceStub(channel),
            rule=pb_grpc.RuleServiceStub(channel),
            host=pb_grpc.HostServiceStub(channel),
            cluster=pb_grpc.ClusterServiceStub(channel),
            image=pb_grpc.ImageServiceStub(channel),
        )
    finally:
        await channel.close()
        await server.stop(0)
        if lease:
            await store.revoke(lease)
        await cache.close()
        await store.close()
        await client.close()
