"""The agent on a 3-member etcd cluster: losing the member it talks to fences nothing."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest
from agent.conftest import vm
from hvplace.agent.config import AgentConfig
from hvplace.agent.service import Agent
from hvplace.proto import keyspace
from hvplace.proto.codec import dumps
from hvplace.proto.records import Assignment, DomainState
from support.etcd import EtcdCluster, members_connected_from
from support.wait import eventually

StartAgent = Callable[[AgentConfig], Any]


async def _running(agent: Agent, key: str) -> bool:
    found = (await agent.hv.list_managed()).get(key)
    return found is not None and found.state is DomainState.RUNNING


def _assign(cluster: EtcdCluster, host: str, name: str) -> None:
    record = Assignment(vm=vm(name), host=host, epoch=1)
    cluster.etcdctl("put", keyspace.assignment(host, "s", name), dumps(record).decode())


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_killing_the_member_in_use_fences_nothing(
    role: str,
    etcd_cluster: EtcdCluster,
    test_host: Callable[..., AgentConfig],
    run_agent: StartAgent,
) -> None:
    """kill -9 of the member the agent is connected to, raft's leader or a follower: the
    lease is renewed through another member (same lease, no fence, the domain keeps
    running), and the assignment watch resumes there (a new assignment starts with no
    resync to catch it). The leader's death costs an election (~1.5 s here), inside the
    default fence window (fence_after 3 s minus a 0.75 s renewal interval)."""
    leader = etcd_cluster.leader()
    members = sorted(etcd_cluster.members, key=lambda m: (m is leader) == (role == "follower"))
    cfg = dataclasses.replace(
        test_host("h1", etcd_endpoints=tuple(m.endpoint for m in members)),
        resync_interval_s=600.0,  # only the watch can bring the second assignment
    )
    agent = await run_agent(cfg)
    _assign(etcd_cluster, "h1", "a")
    await eventually(lambda: _running(agent, "s/a"))
    domain = (await agent.hv.list_managed())["s/a"]
    lease = agent.lease_id
    renewals = agent.metrics.lease_renew._sum.get()
    in_use = await eventually(lambda: members_connected_from(etcd_cluster))
    assert len(in_use) == 1, f"the agent talks to {len(in_use)} members"
    victim = in_use[0]
    assert (victim is leader) == (role == "leader")
    killed_at = time.monotonic()
    victim.kill()

    def renewed_since() -> bool:
        return agent.metrics.lease_renew._sum.get() > renewals

    await eventually(renewed_since, within=agent.cluster.fence_after_s)
    _assign(etcd_cluster, "h1", "b")
    await eventually(lambda: _running(agent, "s/b"), within=5)
    # Past the fence window since the kill: the lease held all along.
    while time.monotonic() - killed_at < agent.cluster.fence_after_s + 0.5:
        await eventually(lambda: _running(agent, "s/a"))
        assert agent.fence_count == 0 and not agent.fenced
    assert agent.lease_id == lease
    after = (await agent.hv.list_managed())["s/a"]
    assert after.state is DomainState.RUNNING and after.domain == domain.domain
    raw = etcd_cluster.etcdctl("get", keyspace.host("h1"), "-w", "fields")
    assert f'"Lease" : {lease}' in raw
    assert victim not in members_connected_from(etcd_cluster)
