"""etcd's own access control, bootstrapped by hvplace on a real etcd of the test's own:
etcd itself refuses an agent's write to another host's keys, and a caller without
credentials."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc
from hvplace.coordinator import cli
from hvplace.coordinator.etcd_auth import EtcdAdmin, add_agent, init_auth
from hvplace.proto import keyspace
from support.etcd import EtcdServer


@pytest.fixture
def private_etcd() -> Iterator[EtcdServer]:
    # Auth stays on once enabled: never on the session's shared etcd.
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def channel(private_etcd: EtcdServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(private_etcd.endpoint) as ch:
        yield ch


async def login(ch: grpc.aio.Channel, user: str, password: str) -> tuple[tuple[str, str], ...]:
    reply = await rpc.AuthStub(ch).Authenticate(
        rpc.AuthenticateRequest(name=user, password=password), timeout=5
    )
    return (("token", reply.token),)


async def put(ch: grpc.aio.Channel, md: tuple[tuple[str, str], ...], key: str) -> grpc.StatusCode:
    try:
        await rpc.KVStub(ch).Put(rpc.PutRequest(key=key.encode(), value=b"{}"), metadata=md)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def get(
    ch: grpc.aio.Channel, md: tuple[tuple[str, str], ...], key: str, prefix: bool = True
) -> grpc.StatusCode:
    end = keyspace.prefix_end(key).encode() if prefix else b""
    request = rpc.RangeRequest(key=key.encode(), range_end=end)
    try:
        await rpc.KVStub(ch).Range(request, metadata=md)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


OK, DENIED = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED


async def test_agent_may_write_only_its_own_host(channel: grpc.aio.Channel) -> None:
    admin = EtcdAdmin(channel)
    assert await init_auth(admin, "r00t-pw", "coord-pw") is False
    assert await init_auth(EtcdAdmin(channel), "r00t-pw", "coord-pw") is True  # idempotent
    await add_agent(EtcdAdmin(channel), "r00t-pw", "hv1", "hv1-pw")
    await add_agent(EtcdAdmin(channel), "r00t-pw", "hv2", "hv2-pw")

    coord = await login(channel, "coordinator", "coord-pw")
    assert await put(channel, coord, keyspace.assignment("hv1", "acme", "web-1")) == OK
    assert await put(channel, coord, keyspace.CONFIG) == OK

    hv1 = await login(channel, "agent-hv1", "hv1-pw")
    assert await put(channel, hv1, keyspace.host("hv1")) == OK
    assert await put(channel, hv1, keyspace.domain("hv1", "acme", "web-1")) == OK
    assert await get(channel, hv1, keyspace.assignments_of("hv1")) == OK
    assert await get(channel, hv1, keyspace.CONFIG, prefix=False) == OK
    # Everything else is refused by etcd itself.
    assert await put(channel, hv1, keyspace.host("hv2")) == DENIED
    assert await put(channel, hv1, keyspace.host("hv10")) == DENIED  # not a prefix grant
    assert await put(channel, hv1, keyspace.domain("hv2", "acme", "web-1")) == DENIED
    assert await put(channel, hv1, keyspace.assignment("hv1", "acme", "web-2")) == DENIED
    assert await put(channel, hv1, keyspace.vm("acme", "web-2")) == DENIED
    assert await get(channel, hv1, keyspace.assignments_of("hv2")) == DENIED
    assert await get(channel, hv1, keyspace.VMS) == DENIED

    # No credentials, or a wrong password: refused.
    assert await get(channel, (), keyspace.ROOT) != OK
    with pytest.raises(grpc.aio.AioRpcError):
        await login(channel, "agent-hv1", "guess")


async def test_cli_bootstraps_and_issues_a_hosts_credentials(
    private_etcd: EtcdServer, tmp_path: Path
) -> None:
    d = tmp_path
    base = ["--etcd", private_etcd.endpoint, "--root-password-file", str(d / "root")]
    for _ in range(2):  # idempotent
        code = await asyncio.to_thread(
            cli.main, ["etcd", "init-auth", *base, "--coordinator-password-file", str(d / "c")]
        )
        assert code == 0
    code = await asyncio.to_thread(
        cli.main, ["etcd", "add-agent", "hv7", *base, "--password-file", str(d / "hv7")]
    )
    assert code == 0 and oct((d / "hv7").stat().st_mode & 0o777) == "0o600"
    async with grpc.aio.insecure_channel(private_etcd.endpoint) as ch:
        md = await login(ch, "agent-hv7", (d / "hv7").read_text().strip())
        assert await put(ch, md, keyspace.host("hv7")) == OK
        assert await put(ch, md, keyspace.host("hv1")) == DENIED
    code = await asyncio.to_thread(
        cli.main, ["etcd", "add-agent", "bad/name", *base, "--password-file", str(d / "x")]
    )
    assert code == cli.EXIT_ERROR and not (d / "x").exists()
