"""The agent's side of a live migration, against a real etcd and libvirt's test:/// driver:
the target keeps an incoming guest while its migration is recorded and adopts it (re-tag,
same running domain) when the assignment comes with `adopt_epoch`; a source whose libvirt
refuses the migration reports why and keeps the guest running."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from agent.conftest import domain_status, put_assignment, vm
from hvplace.agent.config import AgentConfig
from hvplace.agent.service import Agent
from hvplace.proto import keyspace
from hvplace.proto.codec import dumps
from hvplace.proto.records import Assignment, DomainState, Migration
from support.etcd import EtcdServer
from support.wait import eventually

StartAgent = Callable[[AgentConfig], Any]


def passes(agent: Agent) -> float:
    """Reconcile passes the agent has completed (its histogram's count)."""
    for metric in agent.metrics.reconcile.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0


async def seen_by_agent(agent: Agent) -> None:
    """Until a reconcile pass that began after now has completed: one in flight now
    ends (+1), and the change just written triggers another (+2)."""
    before = passes(agent)
    agent._trigger()
    await eventually(lambda: passes(agent) >= before + 2)


def put_migration(etcd: EtcdServer, m: Migration) -> None:
    for host in (m.source, m.target):
        etcd.etcdctl("put", keyspace.migration(host, m.scope, m.name), dumps(m).decode())


def delete_migration(etcd: EtcdServer, m: Migration) -> None:
    for host in (m.source, m.target):
        etcd.etcdctl("del", keyspace.migration(host, m.scope, m.name))


async def test_target_keeps_the_incoming_guest_then_adopts_it(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    agent: Agent = await run_agent(test_host("h2", etcd_endpoints=(etcd.endpoint,)))
    machine = vm("a")
    m = Migration(scope="s", name="a", uid=machine.uid, source="h1", target="h2", epoch=1)
    put_migration(etcd, m)
    await seen_by_agent(agent)
    # The guest libvirt brings in: a domain tagged with the source's epoch, running.
    name = await agent.hv.define(Assignment(vm=machine, host="h2", epoch=1))
    await agent.hv.start(name)
    started_as = await agent.hv.domain_id(name)
    agent._trigger()
    status = await eventually(
        lambda: (s := domain_status(etcd, "h2", "s", "a")) and s.state is DomainState.RUNNING and s
    )
    assert status.epoch == 1 and "s/a" in await agent.hv.list_managed()
    # The commit: assignment at epoch 2 adopting epoch 1, record gone (one transaction).
    a = Assignment(vm=machine, host="h2", epoch=2, adopt_epoch=1)
    etcd.etcdctl("put", keyspace.assignment("h2", "s", "a"), dumps(a).decode())
    delete_migration(etcd, m)

    async def retagged() -> bool:
        observed = (await agent.hv.list_managed()).get("s/a")
        return observed is not None and observed.epoch == 2

    await eventually(retagged)
    assert await agent.hv.domain_id(name) == started_as  # the same running guest
    status = await eventually(
        lambda: (s := domain_status(etcd, "h2", "s", "a")) is not None and s.epoch == 2 and s
    )
    assert status.state is DomainState.RUNNING


async def test_target_destroys_the_incoming_guest_when_the_migration_is_aborted(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    agent: Agent = await run_agent(test_host("h2", etcd_endpoints=(etcd.endpoint,)))
    machine = vm("a")
    m = Migration(scope="s", name="a", uid=machine.uid, source="h1", target="h2", epoch=1)
    put_migration(etcd, m)
    await seen_by_agent(agent)
    name = await agent.hv.define(Assignment(vm=machine, host="h2", epoch=1))
    await agent.hv.start(name)
    agent._trigger()
    await eventually(lambda: domain_status(etcd, "h2", "s", "a"))
    assert "s/a" in await agent.hv.list_managed()  # kept while recorded
    delete_migration(etcd, m)

    async def gone() -> bool:
        return "s/a" not in await agent.hv.list_managed()

    await eventually(gone)


async def test_source_reports_libvirts_refusal_and_the_guest_runs_on(
    etcd: EtcdServer, test_host: Callable[..., AgentConfig], run_agent: StartAgent
) -> None:
    agent: Agent = await run_agent(test_host("h1", etcd_endpoints=(etcd.endpoint,)))
    machine = vm("a")
    put_assignment(etcd, "h1", machine, epoch=1)
    await eventually(
        lambda: (s := domain_status(etcd, "h1", "s", "a")) and s.state is DomainState.RUNNING
    )
    m = Migration(
        scope="s",
        name="a",
        uid=machine.uid,
        source="h1",
        target="h2",
        epoch=1,
        target_uri="test:///default",
        target_address="127.0.0.1",
        target_console_dir="/tmp",
        started_at=1.0,
        timeout_s=30,
    )
    put_migration(etcd, m)
    status = await eventually(
        lambda: (s := domain_status(etcd, "h1", "s", "a")) and s.migration_error and s
    )
    assert status.state is DomainState.RUNNING and not status.migrated_to
    assert "migrating" in status.migration_error
    observed = (await agent.hv.list_managed())["s/a"]
    assert observed.state is DomainState.RUNNING and observed.epoch == 1
    # A new request for the same move is a new migration: run again, reported as such.
    again = dataclasses.replace(m, started_at=m.started_at + 1)
    delete_migration(etcd, m)
    put_migration(etcd, again)
    await eventually(
        lambda: (
            (s := domain_status(etcd, "h1", "s", "a"))
            and s.migration_started_at == again.started_at
            and s.migration_error
        )
    )
