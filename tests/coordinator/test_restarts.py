"""Failed starts and phases, end to end in one process: the API, the controller and three
agents on test:/// hosts against a real etcd. A VM whose spec libvirt refuses (written
straight into etcd, past the API's validation) hops to another host, stops after
`max_start_attempts` hosts as `failed` with each host's reason, and `vm start` retries it;
phases follow the agents' reports: scheduled -> running, stop -> stopped."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from agent.conftest import node_xml
from hvplace.agent.config import AgentConfig
from hvplace.agent.service import Agent
from hvplace.cli import main as cli
from hvplace.coordinator.controller import Controller
from hvplace.proto import codec, keyspace
from hvplace.proto.records import VM, ClusterConfig, Image, Resources
from hvplace.proto.v1 import hvplace_pb2 as pb
from support.api import Api, running_api
from support.etcd import EtcdServer
from support.wait import eventually

CLUSTER = ClusterConfig(lease_ttl_s=5, fence_after_s=3, failover_delay_s=0.5)
IMAGE = pb.Image(kernel="/boot/k", initrd="/boot/i", cmdline="console=ttyS0")


@asynccontextmanager
async def cluster(
    etcd: EtcdServer, tmp: Path, hosts: int = 3, image_dirs: tuple[Path, ...] | None = None
) -> AsyncIterator[Api]:
    """API + controller + `hosts` agents on test:/// hosts, all stopped afterwards."""
    async with running_api(etcd) as api:
        b = api.backend
        ctl = Controller(b.store, b.cache, b.planner, cluster_default=CLUSTER, resync_s=30)
        ctl_task = asyncio.create_task(ctl.run(None))  # type: ignore[arg-type]
        agents: list[tuple[Agent, asyncio.Task[None]]] = []
        try:
            for i in range(1, hosts + 1):
                node = tmp / f"h{i}-node.xml"
                node.write_text(node_xml())
                cfg = AgentConfig(
                    host=f"h{i}",
                    libvirt_uri=f"test://{node}",
                    state_dir=tmp / f"h{i}",
                    etcd_endpoints=(etcd.endpoint,),
                    metrics_listen="",
                    resync_interval_s=1.0,
                    image_dirs=image_dirs,
                )
                agent = Agent(cfg)
                agents.append((agent, asyncio.ensure_future(agent.run())))
                await asyncio.wait_for(agent.registered.wait(), 15)
            await eventually(lambda: len(b.cache.hosts.records) == hosts)
            yield api
            assert all(not t.done() for _a, t in agents), "an agent died"
        finally:
            for agent, task in agents:
                await agent.shutdown()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 15)
            ctl_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ctl_task


async def get(api: Api, name: str) -> pb.VMView:
    view: pb.VMView = await api.vm.GetVM(pb.VMRef(scope="acme", name=name))
    return view


async def phase(api: Api, name: str) -> str:
    return (await get(api, name)).status.phase


def put_poison(etcd: EtcdServer, name: str) -> None:
    """A spec no host can define (a control character XML cannot carry: the agent's
    validator refuses it, libvirt would too), written as no API would."""
    vm = VM(
        scope="acme",
        name=name,
        uid=f"uid-{name}",
        description="bell \x01",
        resources=Resources(1, 64, 0),
        image=Image(kernel="/boot/k", initrd="/boot/i", cmdline="console=ttyS0"),
    )
    etcd.etcdctl("put", keyspace.vm("acme", name), codec.dumps(vm).decode())


async def cli_json(api: Api, *argv: str) -> object:
    """The CLI, in a thread (its gRPC client is blocking; the API runs on this loop)."""
    import io
    from contextlib import redirect_stdout

    def run() -> str:
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli.main(["--endpoint", api.endpoint, "--json", *argv]) == 0
        return out.getvalue()

    return json.loads(await asyncio.to_thread(run))


async def test_phases_follow_the_agents_reports(etcd: EtcdServer, tmp_path: Path) -> None:
    async with cluster(etcd, tmp_path) as api:
        spec = pb.VM(scope="acme", name="web", resources=pb.Resources(vcpus=1, memory_mib=64))
        spec.image.CopyFrom(IMAGE)
        created = await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[spec]))
        assert created.vms[0].status.phase == "scheduled"
        await eventually(lambda: _is(api, "web", "running"))
        listed = await cli_json(api, "vm", "list", "--phase", "running")
        assert [v["spec"]["name"] for v in listed["vms"]] == ["web"]  # type: ignore[index]
        await api.vm.StopVM(pb.VMRef(scope="acme", name="web"))
        await eventually(lambda: _is(api, "web", "stopped"))
        status = await api.cluster.GetClusterStatus(pb.Empty())
        assert dict(status.vms_by_phase) == {"stopped": 1}
        await api.vm.StartVM(pb.VMRef(scope="acme", name="web"))
        await eventually(lambda: _is(api, "web", "running"))


async def _is(api: Api, name: str, wanted: str) -> bool:
    return await phase(api, name) == wanted


@pytest.mark.timeout(120)
async def test_a_vm_failing_everywhere_stops_after_three_hosts_and_vm_start_retries(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    async with cluster(etcd, tmp_path, hosts=4) as api:
        spec = pb.VM(scope="acme", name="good", resources=pb.Resources(vcpus=1, memory_mib=64))
        spec.image.CopyFrom(IMAGE)
        await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[spec]))
        await eventually(lambda: _is(api, "good", "running"))
        put_at = time.monotonic()
        put_poison(etcd, "bad")
        view = await eventually(lambda: _failed_with(api, "bad", 3), within=30)
        took = {"poison_failed_on_3_hosts_s": round(time.monotonic() - put_at, 2)}
        print(json.dumps(took), file=sys.stderr)
        failures = view.status.start_failures
        hosts = [f.host for f in failures]
        assert len(set(hosts)) == 3, f"three different hosts: {hosts}"
        assert all("control character" in f.reason for f in failures)
        for h in hosts:
            assert h in view.status.reason
        assert "max_start_attempts is 3" in view.status.reason
        # It stays failed: taken off its last host, not placed again.
        epoch = view.status.epoch
        await asyncio.sleep(1.5)
        again = await get(api, "bad")
        assert again.status.phase == "failed" and again.status.epoch == epoch
        assert "acme/bad" not in api.backend.cache.assignments.records
        listed = await api.vm.ListVMs(pb.ListVMsRequest(phase="failed"))
        assert [v.spec.name for v in listed.vms] == ["bad"]
        why = await api.vm.ExplainVM(pb.VMRef(scope="acme", name="bad"))
        assert (
            why.reasons[0].code == "start_failed" and "control character" in why.reasons[0].message
        )
        # The good VM never moved and still runs.
        assert await phase(api, "good") == "running"

        # An operator retries: the count is cleared and it is tried again (and fails again).
        t0 = time.time()
        await api.vm.StartVM(pb.VMRef(scope="acme", name="bad"))
        view = await eventually(lambda: _failed_with(api, "bad", 3, after=t0), within=30)
        assert view.status.epoch > epoch
        assert await phase(api, "good") == "running"


async def _failed_with(api: Api, name: str, n: int, after: float = 0.0) -> pb.VMView | None:
    view = await get(api, name)
    st = view.status
    if st.phase != "failed" or len(st.start_failures) != n:
        return None
    if any(f.at < after for f in st.start_failures):
        return None
    return view


async def test_a_degraded_host_takes_no_new_vm_and_keeps_its_own(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A host whose agent reports libvirt unusable is `degraded` with the reason (host list,
    cluster status, the hosts gauge, placement's explain) and its VMs stay where they are."""
    from hvplace.coordinator.metrics import CoordinatorMetrics

    async with running_api(etcd) as api:
        b = api.backend
        ctl = Controller(b.store, b.cache, b.planner, cluster_default=CLUSTER, resync_s=30)
        task = asyncio.create_task(ctl.run(None))  # type: ignore[arg-type]
        try:
            await api.add_host("h1", memory_mib=4096)
            await api.add_host("h2", memory_mib=4096)
            spec = pb.VM(scope="acme", name="a", resources=pb.Resources(vcpus=1, memory_mib=64))
            spec.image.CopyFrom(IMAGE)
            created = await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[spec]))
            home = created.vms[0].status.host
            other = "h2" if home == "h1" else "h1"
            # Its agent reports libvirt gone (as hvplace-agent writes it, on a lease).
            info = b.cache.hosts.records[home]
            down = dataclasses.replace(
                info,
                hypervisor_error="libvirt at qemu:///system unreachable: EOF",
                hypervisor_error_since=time.time(),
            )
            lease = await api.client.lease(60)
            await api.client.put(keyspace.host(home).encode(), codec.dumps(down), lease=lease)
            await eventually(lambda: b.cache.hosts.records[home].hypervisor_error)
            hosts = {h.info.name: h for h in (await api.host.ListHosts(pb.Empty())).hosts}
            assert hosts[home].status.state == "degraded"
            assert "unreachable: EOF" in hosts[home].status.reason
            assert hosts[other].status.state in ("", "ready")
            status = await api.cluster.GetClusterStatus(pb.Empty())
            assert dict(status.hosts_by_state) == {"degraded": 1, "ready": 1}
            metrics = CoordinatorMetrics()
            metrics.refresh_state(b.cache)
            assert metrics.hosts.labels(state="degraded")._value.get() == 1
            # New VMs go elsewhere; with the other host full, explain names the state.
            spec.name = "b"
            created = await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[spec]))
            assert created.vms[0].status.host == other
            spec.name = "big"
            spec.resources.memory_mib = 4040  # free on the other: 4032
            created = await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[spec]))
            assert created.vms[0].status.phase == "pending"
            assert "host degraded" in created.vms[0].status.reason
            # Its VM is not moved for it, and carries the host's reason.
            await asyncio.sleep(1.0)
            view = await get(api, "a")
            assert view.status.host == home and b.cache.assignments.records["acme/a"].host == home
            assert "degraded" in view.status.reason
            # Recovered: ready again, with no one writing a status.
            await api.client.put(keyspace.host(home).encode(), codec.dumps(info), lease=lease)
            await eventually(lambda: not b.cache.hosts.records[home].hypervisor_error)
            hosts = {h.info.name: h for h in (await api.host.ListHosts(pb.Empty())).hosts}
            assert hosts[home].status.state in ("", "ready")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
