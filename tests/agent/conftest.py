"""Agent test helpers: a test:/// host description, an in-process agent, etcd record writers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hvplace.agent.config import AgentConfig
from hvplace.agent.service import Agent
from hvplace.proto import keyspace
from hvplace.proto.codec import dumps, loads
from hvplace.proto.records import VM, Assignment, DomainStatus, Image
from support.etcd import EtcdServer

UNMANAGED_DOMAIN = """
  <domain type='test'>
    <name>not-ours</name>
    <memory unit='MiB'>128</memory>
    <vcpu>1</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
  </domain>"""


def node_xml(cpus: int = 8, memory_mib: int = 16384, domains: str = "") -> str:
    """What `test:///<file>` reports: one simulated host (each connection gets its own state)."""
    return f"""<node>
  <cpu><mhz>2400</mhz><model>x86_64</model><active>{cpus}</active><nodes>1</nodes>
    <sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>
  <memory>{memory_mib * 1024}</memory>{domains}
</node>
"""


def vm(name: str, scope: str = "s", **kw: Any) -> VM:
    image = kw.pop("image", Image(kernel="/boot/k", initrd="/boot/i", cmdline="console=ttyS0"))
    return VM(scope=scope, name=name, uid=kw.pop("uid", f"uid-{name}"), image=image, **kw)


def put_assignment(etcd: EtcdServer, host: str, machine: VM, epoch: int = 1) -> None:
    a = Assignment(vm=machine, host=host, epoch=epoch)
    etcd.etcdctl("put", keyspace.assignment(host, machine.scope, machine.name), dumps(a).decode())


def get_prefix(etcd: EtcdServer, prefix: str) -> dict[str, str]:
    out = etcd.etcdctl("get", "--prefix", prefix).splitlines()
    return dict(zip(out[0::2], out[1::2], strict=True))


def domain_status(etcd: EtcdServer, host: str, scope: str, name: str) -> DomainStatus | None:
    raw = get_prefix(etcd, keyspace.domain(host, scope, name)).get(
        keyspace.domain(host, scope, name)
    )
    return None if raw is None else loads(DomainStatus, raw)


@pytest.fixture
def test_host(tmp_path: Path) -> Callable[..., AgentConfig]:
    """An agent config for a simulated host named `name` on its own node file."""

    def make(name: str = "h1", domains: str = "", **kw: Any) -> AgentConfig:
        node = tmp_path / f"{name}-node.xml"
        node.write_text(node_xml(domains=domains))
        return AgentConfig(
            host=name,
            libvirt_uri=f"test://{node}",
            state_dir=tmp_path / name,
            metrics_listen="127.0.0.1:0",
            resync_interval_s=1.0,
            **kw,
        )

    return make


@pytest.fixture
async def run_agent() -> AsyncIterator[Callable[[AgentConfig], Any]]:
    """Start agents in this event loop; every one is shut down after the test."""
    running: list[tuple[Agent, asyncio.Task[None]]] = []

    async def start(cfg: AgentConfig) -> Agent:
        agent = Agent(cfg)
        task = asyncio.ensure_future(agent.run())
        running.append((agent, task))
        waiter = asyncio.ensure_future(agent.registered.wait())
        await asyncio.wait([waiter, task], timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            waiter.cancel()
            task.result()  # raises the agent's error
        assert agent.registered.is_set(), "agent did not register in 15 s"
        return agent

    yield start
    for agent, task in running:
        await agent.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
