"""The rebalancer moving VMs for real: the API, the controller, the cold mover and agents on
test:/// hosts against a real etcd. `rule create --rebalance`, `policy set --rebalance`,
`host label --rebalance` and `rebalance --apply` each move as few VMs as needed, and a
sampler reading every agent's libvirt throughout never sees a VM active on two hosts;
the leader's loop repairs a VM failover placed under on_failure=degrade once its host
is back."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from agent.conftest import node_xml
from hvplace.agent.config import AgentConfig
from hvplace.agent.reconcile import ACTIVE
from hvplace.agent.service import Agent
from hvplace.cli import main as cli
from hvplace.coordinator.autorebalance import AutoRebalancer
from hvplace.coordinator.controller import Controller
from hvplace.coordinator.moves import ColdMover
from hvplace.proto import codec, keyspace
from hvplace.proto.records import ClusterConfig, DomainStatus, Enforcement, Rule, RuleKind
from hvplace.proto.v1 import hvplace_pb2 as pb
from support.api import Api, running_api
from support.etcd import EtcdServer
from support.wait import eventually

CLUSTER = ClusterConfig(lease_ttl_s=5, fence_after_s=3, failover_delay_s=0.5)
IMAGE = pb.Image(kernel="/boot/k", initrd="/boot/i", cmdline="console=ttyS0")


@dataclass
class Lab:
    api: Api
    tmp: Path
    etcd: EtcdServer
    agents: dict[str, tuple[Agent, asyncio.Task[None]]] = field(default_factory=dict)
    twice: list[str] = field(default_factory=list)
    samples: int = 0
    reported_twice: list[str] = field(default_factory=list)
    reports: int = 0

    async def start_agent(self, name: str) -> None:
        node = self.tmp / f"{name}-node.xml"
        node.write_text(node_xml())
        cfg = AgentConfig(
            host=name,
            libvirt_uri=f"test://{node}",
            state_dir=self.tmp / name,
            etcd_endpoints=(self.etcd.endpoint,),
            metrics_listen="",
            resync_interval_s=1.0,
            stop_timeout_s=2.0,
        )
        agent = Agent(cfg)
        self.agents[name] = (agent, asyncio.ensure_future(agent.run()))
        await asyncio.wait_for(agent.registered.wait(), 30)

    async def stop_agent(self, name: str) -> None:
        agent, task = self.agents.pop(name)
        await agent.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)

    async def sample(self) -> None:
        """Every agent's libvirt, over and over: a VM active on two hosts is recorded."""
        while True:
            where: dict[str, list[str]] = {}
            for name, (agent, _task) in list(self.agents.items()):
                with contextlib.suppress(Exception):
                    for key, obs in (await agent.hv.list_managed()).items():
                        if obs.state in ACTIVE:
                            where.setdefault(key, []).append(name)
            self.samples += 1
            self.twice.extend(f"{k} on {h}" for k, h in where.items() if len(h) > 1)
            await asyncio.sleep(0.02)

    async def watch_reports(self) -> None:
        """Every domain report the agents write, in etcd's order (none is missed, unlike
        samples): a VM reported active by two hosts at one revision is recorded."""
        store = self.api.backend.store
        active: dict[str, set[str]] = {}
        # From now: the shared etcd's history holds earlier tests' hosts and domains.
        stream = await store.watch(keyspace.DOMAINS, self.api.backend.cache.revision + 1)
        try:
            async for batch in stream:
                for ev in batch.events:
                    host, _, key = ev.key[len(keyspace.DOMAINS) :].partition("/")
                    on = active.setdefault(key, set())
                    on.discard(host)
                    if ev.type == "put" and codec.loads(DomainStatus, ev.value).state in ACTIVE:
                        on.add(host)
                    self.reports += 1
                    if len(on) > 1:
                        self.reported_twice.append(f"{key} on {sorted(on)} at {ev.mod_revision}")
        finally:
            await stream.close()


@asynccontextmanager
async def lab(etcd: EtcdServer, tmp: Path, hosts: int = 3) -> AsyncIterator[Lab]:
    async with running_api(etcd, stop_timeout_s=60) as api:
        b = api.backend
        ctl = Controller(b.store, b.cache, b.planner, cluster_default=CLUSTER, resync_s=30)
        ctl_task = asyncio.create_task(ctl.run(None))  # type: ignore[arg-type]
        it = Lab(api=api, tmp=tmp, etcd=etcd)
        sampler = asyncio.create_task(it.sample())
        reports = asyncio.create_task(it.watch_reports())
        try:
            for i in range(1, hosts + 1):
                await it.start_agent(f"h{i}")
            await eventually(lambda: len(b.cache.hosts.records) == hosts, within=30)
            yield it
            assert all(not t.done() for _a, t in it.agents.values()), "an agent died"
        finally:
            sampler.cancel()
            reports.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reports
            for name in list(it.agents):
                await it.stop_agent(name)
            ctl_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ctl_task
            with contextlib.suppress(asyncio.CancelledError):
                await sampler


def spec(name: str, scope: str = "acme", **labels: str) -> pb.VM:
    vm = pb.VM(scope=scope, name=name, labels=labels)
    vm.resources.CopyFrom(pb.Resources(vcpus=1, memory_mib=64))
    vm.image.CopyFrom(IMAGE)
    return vm


async def views(api: Api, scope: str = "acme") -> dict[str, pb.VMView]:
    resp = await api.vm.ListVMs(pb.ListVMsRequest(scope=scope))
    return {v.spec.name: v for v in resp.vms}


async def all_running(api: Api, scope: str = "acme") -> dict[str, str]:
    """name -> host once every VM of the scope runs, else {}."""
    vs = await views(api, scope)
    if all(v.status.phase == "running" for v in vs.values()):
        return {n: v.status.host for n, v in vs.items()}
    return {}


async def on_one_host(it: Lab, scope: str, *names: str) -> None:
    """Create `names` while only h1 takes VMs (h2, h3 cordoned), then uncordon."""
    api = it.api
    others = [h for h in it.agents if h != "h1"]
    for h in others:
        await api.host.CordonHost(pb.HostRef(name=h))
    await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[spec(n, scope, role="web") for n in names]))
    for h in others:
        await api.host.UncordonHost(pb.HostRef(name=h))
    placed = await eventually(lambda: all_running(api, scope), within=30)
    assert set(placed.values()) == {"h1"}


async def cli_json(api: Api, *argv: str) -> object:
    def run() -> str:
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli.main(["--endpoint", api.endpoint, "--json", *argv]) == 0
        return out.getvalue()

    return json.loads(await asyncio.to_thread(run))


@pytest.mark.timeout(300)
async def test_rebalance_moves_vms_cold_and_never_runs_one_twice(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    async with lab(etcd, tmp_path) as it:
        api = it.api
        # rule create --rebalance: a and b share h1; one of them moves.
        await on_one_host(it, "acme", "a", "b")
        anti = pb.Rule(scope="acme", name="ab", kind="anti_affinity", members=["a", "b"])
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await api.rule.CreateRule(pb.CreateRuleRequest(rule=anti))
        assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        resp = await api.rule.CreateRule(pb.CreateRuleRequest(rule=anti, rebalance=True))
        assert resp.rule.satisfied
        placed = await eventually(lambda: all_running(api), within=60)
        assert placed["a"] != placed["b"]
        assert sum(1 for h in placed.values() if h != "h1") == 1  # one move, not two

        # policy set --rebalance: removing the spread while c, d, e share hosts.
        await api.rule.SetScopePolicy(
            pb.ScopePolicy(scope="web", label_anti_affinity=True, spread=2)
        )
        await api.host.CordonHost(pb.HostRef(name="h3"))
        await api.vm.CreateVMs(
            pb.CreateVMsRequest(vms=[spec(n, "web", role="fe") for n in ("c", "d", "e")])
        )
        await api.host.UncordonHost(pb.HostRef(name="h3"))
        before = await eventually(lambda: all_running(api, "web"), within=30)
        assert len(set(before.values())) == 2
        strict = pb.ScopePolicy(scope="web", label_anti_affinity=True)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await api.rule.SetScopePolicy(strict)
        assert "rebalance" in (e.value.details() or "")
        strict.rebalance = True
        stored = await api.rule.SetScopePolicy(strict)
        assert stored.spread == 0 and not stored.rebalance
        after = await eventually(lambda: all_running(api, "web"), within=60)
        assert len(set(after.values())) == 3
        assert sum(1 for n in after if after[n] != before[n]) == 1

        # host label --rebalance: a's and b's hosts put in one rack under a rack rule.
        for h, rack in (("h1", "r1"), ("h2", "r2"), ("h3", "r3")):
            await api.host.LabelHost(pb.LabelHostRequest(name=h, set={"rack": rack}))
        racks = pb.Rule(
            scope="acme", name="ab", kind="anti_affinity", members=["a", "b"], topology_key="rack"
        )
        await api.rule.UpdateRule(pb.UpdateRuleRequest(rule=racks))
        placed = await all_running(api)
        host_b = placed["b"]
        rack_of_a = {"h1": "r1", "h2": "r2", "h3": "r3"}[placed["a"]]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await api.host.LabelHost(pb.LabelHostRequest(name=host_b, set={"rack": rack_of_a}))
        assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        await api.host.LabelHost(
            pb.LabelHostRequest(name=host_b, set={"rack": rack_of_a}, rebalance=True)
        )
        moved = await eventually(lambda: all_running(api), within=60)
        rule = await api.rule.GetRule(pb.RuleRef(scope="acme", name="ab"))
        assert rule.satisfied, rule.violations
        assert sum(1 for n in moved if moved[n] != placed[n]) == 1

        # rebalance --preview / --apply through the CLI: nothing left to repair.
        preview = await cli_json(api, "rebalance", "--preview")
        assert preview.get("moves", []) == []  # type: ignore[union-attr]
        assert it.samples > 0 and it.reports > 10
        assert not it.twice, it.twice
        assert not it.reported_twice, it.reported_twice


@pytest.mark.timeout(300)
async def test_leader_loop_repairs_a_degraded_vm_when_its_host_returns(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    async with lab(etcd, tmp_path, hosts=2) as it:
        api = it.api
        await api.vm.CreateVMs(pb.CreateVMsRequest(vms=[spec("a"), spec("b")]))
        first = await eventually(lambda: all_running(api), within=30)
        assert first["a"] != first["b"]
        rule = pb.Rule(
            scope="acme", name="ab", kind="anti_affinity", members=["a", "b"], on_failure="degrade"
        )
        await api.rule.CreateRule(pb.CreateRuleRequest(rule=rule))
        # h2's agent stops (lease revoked): failover restarts its VM on h1, degraded.
        await it.stop_agent("h2")
        gone = first["a"] if first["a"] == "h2" else first["b"]
        del gone

        async def degraded() -> bool:
            vs = await views(api)
            return any(v.status.degraded for v in vs.values()) and bool(await all_running(api))

        await eventually(degraded, within=60)
        b = api.backend
        mover = ColdMover(b.store, b.cache, b.planner, stop_timeout_s=60)
        auto = AutoRebalancer(b.cache, mover, interval_s=1.0, max_moves=1)
        loop = asyncio.create_task(auto.run())
        try:
            await it.start_agent("h2")  # capacity returns

            async def repaired() -> bool:
                placed = await all_running(api)
                vs = await views(api)
                return (
                    bool(placed)
                    and placed["a"] != placed["b"]
                    and not any(v.status.degraded for v in vs.values())
                )

            await eventually(repaired, within=90)
            assert auto.moves == 1
            view = await api.rule.GetRule(pb.RuleRef(scope="acme", name="ab"))
            assert view.satisfied
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        assert not it.twice, it.twice
        assert not it.reported_twice, it.reported_twice


@pytest.mark.timeout(300)
async def test_rebalance_apply_through_the_cli(etcd: EtcdServer, tmp_path: Path) -> None:
    async with lab(etcd, tmp_path, hosts=2) as it:
        api = it.api
        await on_one_host(it, "acme", "a", "b", "c")
        # Rules written past the API, as failovers under on_failure=degrade leave them.
        for name, members in (("ab", ("a", "b")), ("soft", ("a", "c"))):
            rule = Rule(
                scope="acme",
                name=name,
                kind=RuleKind.ANTI_AFFINITY,
                members=members,
                enforcement=Enforcement.REQUIRED if name == "ab" else Enforcement.PREFERRED,
                weight=0 if name == "ab" else 10,
            )
            etcd.etcdctl("put", keyspace.rule("acme", name), codec.dumps(rule).decode())
        preview = await cli_json(api, "rebalance", "--preview")
        assert preview["repair_moves"] == 1 and preview["minimal"]  # type: ignore[index]
        done = await cli_json(api, "rebalance", "--apply", "--max-moves", "1")
        moves = done["moves"]  # type: ignore[index]
        assert len(moves) == 1 and moves[0]["done"] and done["applied"]  # type: ignore[index]
        placed = await eventually(lambda: all_running(api), within=60)
        assert placed["a"] != placed["b"]
        view = await api.rule.GetRule(pb.RuleRef(scope="acme", name="ab"))
        assert view.satisfied
        assert not it.twice, it.twice
        assert not it.reported_twice, it.reported_twice
