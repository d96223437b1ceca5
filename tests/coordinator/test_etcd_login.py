"""The etcd client's logins against a real etcd with auth on: after an etcd restart (every
token gone) its calls log in once between them, a lease renewal never waits for a login,
and a change to etcd's users or roles (every token stale) costs one login, not an error.

etcd runs with a high bcrypt cost here, so a login takes about a second of etcd's CPU: as
on a loaded host, where a login storm after a restart kept a whole lab's agents from
renewing their leases until they fenced."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aetcd import rpc
from hvplace.proto import keyspace
from hvplace.runtime.etcd import EtcdAuth, EtcdClient, EtcdTLS
from support.etcd import EtcdCerts, EtcdServer
from support.etcd_auth import add_host_user, auth_etcd
from support.wait import eventually

BCRYPT_COST = 14
"""16x etcd's default: about a second per check of agent-hv1's password on this hardware."""


@pytest.fixture
def slow_auth_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdCerts]]:
    with auth_etcd(tmp_path, ("hv1",), bcrypt_cost=BCRYPT_COST) as server_certs:
        yield server_certs


@pytest.fixture
async def agent_client(
    slow_auth_etcd: tuple[EtcdServer, EtcdCerts], tmp_path: Path
) -> AsyncIterator[EtcdClient]:
    server, certs = slow_auth_etcd
    client = EtcdClient(
        [server.url],
        tls=EtcdTLS(ca=certs.ca, cert=certs.client_cert, key=certs.client_key),
        auth=EtcdAuth("agent-hv1", tmp_path / "hv1"),
    )
    try:
        yield client
    finally:
        await client.close()


def _get_host() -> rpc.RangeRequest:
    return rpc.RangeRequest(key=keyspace.host("hv1").encode())


async def _registered(client: EtcdClient) -> int:
    """As an agent starts: a lease and the host key on it (a write, so that etcd's
    backend records having applied the login: a restart does not replay it)."""
    lease = int((await client.lease_grant(rpc.LeaseGrantRequest(TTL=30), timeout_s=30)).ID)
    put = rpc.PutRequest(key=keyspace.host("hv1").encode(), value=b"{}", lease=lease)
    await client.put(put, timeout_s=30)
    assert client.logins == 1
    return lease


async def _restart(server: EtcdServer) -> None:
    """Stop etcd by PID and start it again on the same data: every token is gone."""
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start)


async def test_calls_after_an_etcd_restart_log_in_once(
    slow_auth_etcd: tuple[EtcdServer, EtcdCerts], agent_client: EtcdClient
) -> None:
    """Every call refused for the lost token waits for one login, not one login each
    (each a bcrypt check that etcd 3.4 serves one at a time)."""
    server, _ = slow_auth_etcd
    await _registered(agent_client)
    await _restart(server)
    replies = await asyncio.gather(
        *(agent_client.range(_get_host(), timeout_s=60) for _ in range(6))
    )
    assert all(r.kvs[0].value == b"{}" for r in replies)
    assert agent_client.logins == 2


async def test_a_lease_renewal_does_not_wait_for_a_login(
    slow_auth_etcd: tuple[EtcdServer, EtcdCerts], agent_client: EtcdClient
) -> None:
    """An agent's renewal while its other calls log in again after an etcd restart goes
    through at once: etcd does not check a token on LeaseKeepAlive. Waiting for the
    login (seconds on a busy etcd) is what fenced every host of a lab."""
    server, _ = slow_auth_etcd
    lease = await _registered(agent_client)
    await _restart(server)
    reading = asyncio.ensure_future(agent_client.range(_get_host(), timeout_s=60))
    try:
        await eventually(lambda: not agent_client.logged_in, 30)  # the token was refused
        for _ in range(3):
            assert await agent_client.keepalive(lease, timeout_s=1.0) > 0
        assert not reading.done(), "the login was over before the renewals: proves nothing"
        assert (await reading).kvs
    finally:
        reading.cancel()
    assert agent_client.logins == 2


@pytest.fixture
def jwt_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdCerts]]:
    """Signed (JWT) tokens, which carry the auth revision they were issued at."""
    key, public = tmp_path / "jwt.key", tmp_path / "jwt.pub"
    for argv in (
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
        ["ec", "-in", str(key), "-pubout", "-out", str(public)],
    ):
        subprocess.run(["openssl", *argv], check=True, capture_output=True)
    flag = f"--auth-token=jwt,pub-key={public},priv-key={key},sign-method=ES256"
    with auth_etcd(tmp_path, ("hv1",), extra=(flag,)) as server_certs:
        yield server_certs


async def test_a_change_to_users_or_roles_costs_one_login(
    jwt_etcd: tuple[EtcdServer, EtcdCerts], tmp_path: Path
) -> None:
    """Adding a host's user bumps etcd's auth revision, and etcd refuses every token issued
    before it ("revision of auth store is old"): the client logs in again and carries on.
    (Simple tokens meet the same refusal when a write races a change to users or roles.)"""
    server, certs = jwt_etcd
    client = EtcdClient(
        [server.url],
        tls=EtcdTLS(ca=certs.ca, cert=certs.client_cert, key=certs.client_key),
        auth=EtcdAuth("agent-hv1", tmp_path / "hv1"),
    )
    try:
        await _registered(client)
        await asyncio.to_thread(add_host_user, server, "hv2", tmp_path / "hv2")
        reply = await client.range(_get_host(), timeout_s=30)
        assert reply.kvs[0].value == b"{}"
        assert client.logins == 2
    finally:
        await client.close()
