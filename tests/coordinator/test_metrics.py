"""The coordinator's metrics on a real etcd: time in violation per required rule, VMs by
phase, and per-RPC counts and latency by method and status code (refusals included)."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from coord_support import host, register, running, vm
from hvplace.coordinator import config
from hvplace.coordinator.cache import Cache
from hvplace.coordinator.daemon import Coordinator
from hvplace.coordinator.metrics import CoordinatorMetrics
from hvplace.coordinator.store import Fence, Store
from hvplace.proto import codec, keyspace
from hvplace.proto.records import (
    Assignment,
    ClusterConfig,
    Enforcement,
    Phase,
    Rule,
    RuleKind,
    VMStatus,
)
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc
from support.etcd import EtcdServer, free_port
from support.wait import eventually


async def _put(store: Store, cache: Cache, key: str, record: object) -> None:
    revision = await store.put(key, codec.dumps(record))
    await eventually(lambda: cache.revision >= revision)


async def _assign(store: Store, cache: Cache, name: str, on: str) -> None:
    await _put(store, cache, keyspace.assignment(on, "acme", name), Assignment(vm(name), on, 1))


def _value(metrics: CoordinatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_time_in_violation_accumulates_while_a_required_rule_is_broken(
    etcd: EtcdServer,
) -> None:
    metrics = CoordinatorMetrics()
    async with running(etcd) as (store, cache):
        for name in ("h1", "h2"):
            await register(store, host(name))
        for name in ("a", "b"):
            await _put(store, cache, keyspace.vm("acme", name), vm(name))
        apart = Rule("acme", "apart", RuleKind.ANTI_AFFINITY, members=("a", "b"))
        near = Rule(
            "acme", "near", RuleKind.AFFINITY, Enforcement.PREFERRED, weight=5, members=("a", "b")
        )
        await _put(store, cache, keyspace.rule("acme", "apart"), apart)
        await _put(store, cache, keyspace.rule("acme", "near"), near)
        await _assign(store, cache, "a", "h1")
        await _assign(store, cache, "b", "h2")
        seconds = "hvplace_rule_violation_seconds_total"

        metrics.refresh_rules(cache, ClusterConfig(), now=100.0)
        # Every required rule has its series from the first sample, at 0 while it holds.
        assert _value(metrics, seconds, rule="acme/apart") == 0.0
        assert _value(metrics, seconds, rule="acme/near") is None  # preferred: never violated

        await store.delete(keyspace.assignment("h2", "acme", "b"))
        await _assign(store, cache, "b", "h1")  # a and b now share h1: apart is broken
        metrics.refresh_rules(cache, ClusterConfig(), now=103.0)
        assert _value(metrics, "hvplace_rule_satisfied", rule="acme/apart") == 0.0
        assert _value(metrics, seconds, rule="acme/apart") == 0.0  # it held at 100
        metrics.refresh_rules(cache, ClusterConfig(), now=108.0)
        assert _value(metrics, seconds, rule="acme/apart") == 5.0

        await store.delete(keyspace.assignment("h1", "acme", "b"))
        await _assign(store, cache, "b", "h2")  # repaired
        metrics.refresh_rules(cache, ClusterConfig(), now=110.0)
        assert _value(metrics, seconds, rule="acme/apart") == 7.0  # broken at the 108 sample
        metrics.refresh_rules(cache, ClusterConfig(), now=120.0)
        assert _value(metrics, seconds, rule="acme/apart") == 7.0
        assert _value(metrics, "hvplace_rule_satisfied", rule="acme/apart") == 1.0

        # Broken again, then leadership lost and won back: the time between the terms
        # was sampled by another coordinator (or none) and is not counted here.
        await store.delete(keyspace.assignment("h2", "acme", "b"))
        await _assign(store, cache, "b", "h1")
        metrics.refresh_rules(cache, ClusterConfig(), now=130.0)
        metrics.set_leader(None)
        metrics.set_leader(Fence(keyspace.ELECTION + "c1", 42))
        metrics.refresh_rules(cache, ClusterConfig(), now=200.0)
        assert _value(metrics, seconds, rule="acme/apart") == 7.0
        metrics.refresh_rules(cache, ClusterConfig(), now=202.0)
        assert _value(metrics, seconds, rule="acme/apart") == 9.0
        assert _value(metrics, "hvplace_leader_fencing_token") == 42.0


async def test_vms_by_phase_as_the_api_derives_it(etcd: EtcdServer) -> None:
    metrics = CoordinatorMetrics()
    async with running(etcd) as (store, cache):
        for name in ("a", "b", "c"):
            await _put(store, cache, keyspace.vm("acme", name), vm(name))
        await _put(
            store, cache, keyspace.vm_status("acme", "a"), VMStatus("acme", "a", Phase.RUNNING)
        )
        await _put(
            store, cache, keyspace.vm_status("acme", "b"), VMStatus("acme", "b", Phase.FAILED)
        )
        metrics.refresh_state(cache)  # c has no status yet: pending, as the API says
    phases = {p.value: _value(metrics, "hvplace_vms", phase=p.value) for p in Phase}
    assert phases == {"pending": 1, "scheduled": 0, "running": 1, "stopped": 0, "failed": 1}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return text


async def test_rpc_counts_and_latency_by_method_and_code_refusals_included(
    etcd: EtcdServer,
) -> None:
    cfg = config.validate(
        config.CoordinatorConfig(
            node_name="c1",
            etcd_endpoints=(etcd.endpoint,),
            listen=f"127.0.0.1:{free_port()}",
            metrics_listen=f"127.0.0.1:{free_port()}",
            session_ttl_s=2,
            anonymous_role="viewer",
        )
    )
    async with Coordinator(cfg) as c:
        await eventually(lambda: c.election is not None and c.election.is_leader)
        async with grpc.aio.insecure_channel(cfg.listen) as ch:
            stub = pb_grpc.VMServiceStub(ch)
            await stub.ListVMs(pb.ListVMsRequest())
            await stub.ListVMs(pb.ListVMsRequest())
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetVM(pb.VMRef(scope="acme", name="nope"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # a viewer may not create
                await stub.CreateVMs(
                    pb.CreateVMsRequest(vms=[pb.VM(scope="acme", name="x")], request_id="r")
                )
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        text = await asyncio.to_thread(_scrape, c.metrics_port)
        assert c.election is not None and c.election.fence is not None
        token = c.election.fence.revision
    lines = set(text.splitlines())
    for line in (
        'hvplace_api_requests_total{code="OK",method="ListVMs",service="VMService"} 2.0',
        'hvplace_api_requests_total{code="NOT_FOUND",method="GetVM",service="VMService"} 1.0',
        'hvplace_api_requests_total{code="PERMISSION_DENIED",method="CreateVMs",'
        'service="VMService"} 1.0',
        'hvplace_api_request_duration_seconds_count{code="OK",method="ListVMs",'
        'service="VMService"} 2.0',
        'hvplace_api_request_duration_seconds_count{code="PERMISSION_DENIED",'
        'method="CreateVMs",service="VMService"} 1.0',
        "hvplace_leader 1.0",
        f"hvplace_leader_fencing_token {float(token)}",
    ):
        assert line in lines, line
