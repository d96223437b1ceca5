"""The agent as etcd user agent-HOST over TLS: an etcd restart inside the fence window
fences nothing, though every token is gone and logging in again is slow."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hvplace.agent.config import AgentConfig
from support.etcd import EtcdCerts, EtcdServer
from support.etcd_auth import auth_etcd
from support.wait import eventually

BCRYPT_COST = 15
"""32x etcd's default: one login is about two seconds of etcd's CPU here, as a login at
the default cost was on a lab whose QEMU guests kept both cores busy."""


@pytest.fixture
def slow_auth_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdCerts]]:
    with auth_etcd(tmp_path / "etcd", ("h1",), bcrypt_cost=BCRYPT_COST) as server_certs:
        yield server_certs


async def test_an_etcd_restart_inside_the_fence_window_fences_nothing(
    slow_auth_etcd: tuple[EtcdServer, EtcdCerts],
    tmp_path: Path,
    test_host: Callable[..., AgentConfig],
    run_agent: Callable[[AgentConfig], Any],
) -> None:
    """etcd stopped and started again by PID: the agent's renewals go through as soon as
    etcd answers (etcd does not authenticate LeaseKeepAlive), while its other calls
    share one login. Before, each call logged in on its own within its own budget, and
    the renewal waited for a login etcd could not finish in time: the host fenced (at
    this bcrypt cost the agent did not even register in 15 s: its first calls' logins
    crowded each other out the same way).
    A 20 s lease (fence after 12 s, renewals every 3 s) leaves 9 s for the restart."""
    server, certs = slow_auth_etcd
    cfg = dataclasses.replace(
        test_host("h1", etcd_endpoints=(server.url,)),
        etcd_ca=certs.ca,
        etcd_cert=certs.client_cert,
        etcd_key=certs.client_key,
        etcd_user="agent-h1",
        etcd_password_file=tmp_path / "etcd" / "h1",
        lease_ttl=20.0,
    )
    agent = await run_agent(cfg)
    lease = agent.lease_id
    assert agent.store.etcd.logins == 1
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start)
    renewals = agent.metrics.lease_renew._sum.get()

    def renewed_since() -> bool:
        return agent.metrics.lease_renew._sum.get() > renewals

    await eventually(renewed_since, within=agent.cluster.fence_after_s)
    # Its other calls log in again (the restart lost the token), once.
    await eventually(lambda: agent.store.etcd.logins == 2, within=30)
    assert agent.fence_count == 0 and not agent.fenced, "fenced by an etcd restart"
    assert agent.lease_id == lease
