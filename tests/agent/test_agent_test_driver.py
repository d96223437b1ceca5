"""The whole agent against a real etcd and libvirt's test:/// driver (one simulated host each)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from agent.conftest import UNMANAGED_DOMAIN, domain_status, get_prefix, put_assignment, vm
from hvplace.agent.config import AgentConfig
from hvplace.agent.service import Agent
from hvplace.proto import keyspace
from hvplace.proto.codec import dumps, loads
from hvplace.proto.errors import InvalidInput
from hvplace.proto.records import ClusterConfig, DomainState, HostInfo, Power, Resources
from support.etcd import EtcdServer
from support.wait import eventually

StartAgent = Callable[[AgentConfig], Any]


def cfg_for(
    etcd: EtcdServer, make: Callable[..., AgentConfig], name: str, **kw: Any
) -> AgentConfig:
    return make(name, etcd_endpoints=(etcd.endpoint,), **kw)


async def managed_states(agent: Agent) -> dict[str, DomainState]:
    return {k: o.state for k, o in (await agent.hv.list_managed()).items()}


async def test_registers_host_with_capacity_labels_on_a_lease(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    cfg = cfg_for(
        etcd, test_host, "h1", labels={"zone": "east"}, reserved_memory_mib=512, cpu_ratio=4.0
    )
    agent = await run_agent(cfg)
    info = loads(HostInfo, get_prefix(etcd, keyspace.host("h1"))[keyspace.host("h1")])
    assert info.capacity.vcpus == 8 and info.capacity.memory_mib == 16384
    assert info.capacity.disk_gib > 0
    assert info.labels == {"zone": "east"} and info.ratios.cpu == 4.0
    assert info.reserved_memory_mib == 512 and info.domain_type == "test"
    lease = json.loads(etcd.etcdctl("get", keyspace.host("h1"), "-w", "json"))["kvs"][0]["lease"]
    assert lease == agent.lease_id


async def test_reconciles_assignments_and_leaves_unmanaged_domains_alone(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    cfg = cfg_for(etcd, test_host, "h1", domains=UNMANAGED_DOMAIN)
    other = cfg_for(etcd, test_host, "h2")
    agent = await run_agent(cfg)
    await run_agent(other)
    put_assignment(etcd, "h1", vm("web"))
    put_assignment(etcd, "h1", vm("db", power=Power.STOPPED))
    await eventually(
        lambda: _states_are(agent, {"s/web": DomainState.RUNNING, "s/db": DomainState.DEFINED})
    )
    status = await eventually(lambda: domain_status(etcd, "h1", "s", "web"))
    assert status.state is DomainState.RUNNING and status.epoch == 1 and status.uid == "uid-web"

    # Status lives only under this host's own keys, on its lease.
    keys = get_prefix(etcd, keyspace.DOMAINS)
    assert set(keys) == {keyspace.domain("h1", "s", "web"), keyspace.domain("h1", "s", "db")}
    raw = json.loads(etcd.etcdctl("get", keyspace.domain("h1", "s", "web"), "-w", "json"))
    assert raw["kvs"][0]["lease"] == agent.lease_id

    # Unassigning destroys and undefines; the unmanaged domain is never touched.
    etcd.etcdctl("del", keyspace.assignment("h1", "s", "web"))
    await eventually(lambda: _states_are(agent, {"s/db": DomainState.DEFINED}))
    await eventually(lambda: domain_status(etcd, "h1", "s", "web") is None)
    import libvirt  # the test inspects libvirt itself; hvplace code goes through hypervisor.py

    conn = agent.hv._connection()  # type: ignore[attr-defined]
    dom = conn.lookupByName("not-ours")
    assert dom.isActive() == 1  # the node file's domain starts running; it still is
    assert "not-ours" in [d.name() for d in conn.listAllDomains()]
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


async def _states_are(agent: Agent, wanted: dict[str, DomainState]) -> bool:
    return await managed_states(agent) == wanted


async def test_stale_epoch_is_recreated_and_crash_restarted(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    agent = await run_agent(cfg_for(etcd, test_host, "h1"))
    put_assignment(etcd, "h1", vm("a"), epoch=1)
    await eventually(lambda: _states_are(agent, {"s/a": DomainState.RUNNING}))
    put_assignment(etcd, "h1", vm("a"), epoch=2)
    await eventually(lambda: domain_status(etcd, "h1", "s", "a").epoch == 2)  # type: ignore[union-attr]
    assert (await agent.hv.list_managed())["s/a"].epoch == 2
    # A domain that dies is noticed through libvirt's lifecycle event and restarted.
    name = (await agent.hv.list_managed())["s/a"].domain
    await agent.hv.destroy(name)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await eventually(
        lambda: _states_are(agent, {"s/a": DomainState.RUNNING}), within=5, interval=0.02
    )
    assert loop.time() - t0 < 1.0


async def test_bad_spec_is_reported_and_nothing_defined(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    agent = await run_agent(cfg_for(etcd, test_host, "h1"))
    put_assignment(etcd, "h1", vm("bad", resources=Resources(vcpus=1, memory_mib=0)))
    etcd.etcdctl("put", keyspace.assignment("h1", "s", "garbled"), "{not json")
    status = await eventually(lambda: domain_status(etcd, "h1", "s", "bad"))
    assert status.state is DomainState.FAILED
    assert "memory_mib is 0; it must be between 1 and" in status.last_error
    garbled = await eventually(lambda: domain_status(etcd, "h1", "s", "garbled"))
    assert garbled.state is DomainState.FAILED and "not JSON" in garbled.last_error
    assert await agent.hv.list_managed() == {}


async def test_metrics_and_health(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    agent = await run_agent(cfg_for(etcd, test_host, "h1"))
    put_assignment(etcd, "h1", vm("a"))
    await eventually(lambda: _states_are(agent, {"s/a": DomainState.RUNNING}))
    assert agent._server is not None and agent._server.address is not None
    host, port = agent._server.address

    def fetch(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    status, body = await asyncio.to_thread(fetch, "/healthz")
    assert status == 200 and body.strip() == "ok"
    _, text = await eventually(lambda: asyncio.to_thread(_metric_running, fetch))
    assert "hvplace_agent_lease_renew_seconds_count" in text
    assert "hvplace_agent_fence_events_total 0.0" in text


def _metric_running(fetch: Callable[[str], tuple[int, str]]) -> tuple[int, str] | None:
    status, text = fetch("/metrics")
    return (status, text) if 'hvplace_agent_domains{state="running"} 1.0' in text else None


async def test_refuses_an_unsafe_timing_budget(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig]
) -> None:
    etcd.etcdctl(
        "put", keyspace.CONFIG, dumps(ClusterConfig(lease_ttl_s=3, fence_after_s=2.9)).decode()
    )
    agent = Agent(cfg_for(etcd, test_host, "h1"))
    with pytest.raises(InvalidInput, match="unsafe timing budget"):
        await asyncio.wait_for(agent.run(), 15)
    assert get_prefix(etcd, keyspace.HOSTS) == {}


async def test_tells_systemd_ready_and_pets_the_watchdog_device(
    etcd: EtcdServer,
    test_host: Callable[..., AgentConfig],
    run_agent: StartAgent,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """READY=1 reaches $NOTIFY_SOCKET once registered; the watchdog device (a FIFO standing
    in for /dev/watchdog, same write protocol) is petted from the renew loop and disarmed
    with the magic 'V' on a clean shutdown."""
    import contextlib
    import os
    import socket

    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    fifo = tmp_path / "watchdog"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        cfg = cfg_for(etcd, test_host, "h1", watchdog_device=str(fifo))
        agent = await run_agent(cfg)

        def notified() -> bytes | None:
            try:
                return sock.recv(256)
            except BlockingIOError:
                return None

        async def ready() -> bool:
            return notified() == b"READY=1"

        await eventually(ready)
        written = bytearray()

        def device_got(done: Callable[[bytes], bool]) -> Callable[[], bool]:
            def check() -> bool:
                with contextlib.suppress(BlockingIOError):
                    written.extend(os.read(reader, 64))
                return done(bytes(written))

            return check

        await eventually(device_got(lambda b: b.count(b"\0") >= 2))
        await agent.shutdown()  # run() then cleans up: the device is disarmed
        await eventually(device_got(lambda b: b.endswith(b"V")))
    finally:
        os.close(reader)
        sock.close()


async def test_fence_duration_is_observed_from_the_decision_to_every_domain_destroyed(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    """etcd drops the agent's lease (revoked, as when it expires): the agent fences, and
    the histogram holds one observation covering the destroys."""
    agent = await run_agent(cfg_for(etcd, test_host, "h1"))
    put_assignment(etcd, "h1", vm("a"))
    put_assignment(etcd, "h1", vm("b"))
    await eventually(
        lambda: _states_are(agent, {"s/a": DomainState.RUNNING, "s/b": DomainState.RUNNING})
    )
    registry = agent.metrics.registry
    count = "hvplace_agent_fence_duration_seconds_count"
    assert registry.get_sample_value(count) == 0.0
    assert agent.lease_id is not None
    etcd.etcdctl("lease", "revoke", f"{agent.lease_id:x}")
    await eventually(lambda: registry.get_sample_value(count) == 1.0)
    took = registry.get_sample_value("hvplace_agent_fence_duration_seconds_sum")
    assert took is not None and 0.0 < took < 5.0
    assert registry.get_sample_value("hvplace_agent_fence_events_total") == 1.0
