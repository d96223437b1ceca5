"""etcd's own access control, bootstrapped by hvplace on a real etcd of the test's own:
etcd itself refuses an agent's write to another host's keys, and a caller without
credentials."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc
from agent.conftest import node_xml
from hvplace.agent.config import AgentConfig
from hvplace.agent.service import Agent
from hvplace.agent.store import EtcdStore, StoreError
from hvplace.cli import main as cli
from hvplace.coordinator import config
from hvplace.coordinator.daemon import Coordinator
from hvplace.coordinator.etcd_auth import EtcdAdmin, add_agent, init_auth
from hvplace.proto import keyspace
from hvplace.proto.errors import Unavailable
from hvplace.proto.records import HostInfo
from hvplace.proto.v1 import hvplace_pb2 as pb
from hvplace.proto.v1 import hvplace_pb2_grpc as pb_grpc
from hvplace.runtime.etcd import EtcdAuth, EtcdClient, EtcdTLS
from support.etcd import EtcdServer, free_port, make_certs
from support.wait import eventually


@pytest.fixture
async def channel(own_etcd: EtcdServer) -> AsyncIterator[grpc.aio.Channel]:
    # Auth stays on once enabled: never on the session's shared etcd.
    async with grpc.aio.insecure_channel(own_etcd.endpoint) as ch:
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
    own_etcd: EtcdServer, tmp_path: Path
) -> None:
    d = tmp_path
    base = ["--etcd", own_etcd.endpoint, "--root-password-file", str(d / "root")]
    for _ in range(2):  # idempotent
        code = await asyncio.to_thread(
            cli.main, ["etcd", "init-auth", *base, "--coordinator-password-file", str(d / "c")]
        )
        assert code == 0
    code = await asyncio.to_thread(
        cli.main, ["etcd", "add-agent", "hv7", *base, "--password-file", str(d / "hv7")]
    )
    assert code == 0 and oct((d / "hv7").stat().st_mode & 0o777) == "0o600"
    async with grpc.aio.insecure_channel(own_etcd.endpoint) as ch:
        md = await login(ch, "agent-hv7", (d / "hv7").read_text().strip())
        assert await put(ch, md, keyspace.host("hv7")) == OK
        assert await put(ch, md, keyspace.host("hv1")) == DENIED
    code = await asyncio.to_thread(
        cli.main, ["etcd", "add-agent", "bad/name", *base, "--password-file", str(d / "x")]
    )
    assert code == cli.EXIT_ERROR and not (d / "x").exists()


# ---------------------------------------------------------------- the daemons as users


@pytest.fixture
def auth_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A private etcd with auth on (tokens expire after 1 s idle), and password files."""
    server = EtcdServer()
    server.extra_args = ["--auth-token-ttl", "1"]
    server.start()
    try:
        base = ["--etcd", server.endpoint, "--root-password-file", str(tmp_path / "root")]
        assert cli.main(["etcd", "init-auth", *base, "--coordinator-password-file",
                         str(tmp_path / "coordinator")]) == 0  # fmt: skip
        for host in ("hv1", "hv2"):
            assert cli.main(["etcd", "add-agent", host, *base, "--password-file",
                             str(tmp_path / host)]) == 0  # fmt: skip
        yield server
    finally:
        server.close()


async def test_client_logs_in_again_when_etcd_expires_its_token(
    auth_etcd: EtcdServer, tmp_path: Path
) -> None:
    client = EtcdClient([auth_etcd.endpoint], auth=EtcdAuth("agent-hv1", tmp_path / "hv1"))
    try:
        request = rpc.RangeRequest(key=keyspace.CONFIG.encode())
        await client.range(request, timeout_s=5)
        assert client.logins == 1
        await asyncio.sleep(2.5)  # idle past the token's TTL: etcd forgets it
        await client.range(request, timeout_s=5)
        assert client.logins == 2
        wrong = EtcdClient([auth_etcd.endpoint], auth=EtcdAuth("agent-hv1", tmp_path / "hv2"))
        with pytest.raises(Unavailable, match="etcd refused user 'agent-hv1'"):
            await wrong.range(request, timeout_s=5)
        await wrong.close()
    finally:
        await client.close()


async def test_coordinator_and_agent_run_as_their_etcd_users(
    auth_etcd: EtcdServer, tmp_path: Path
) -> None:
    """A whole coordinator (user `coordinator`) places a VM that an agent (user
    `agent-hv1`) runs; the same agent credentials cannot register another host."""
    cfg = config.CoordinatorConfig(
        node_name="c1",
        etcd_endpoints=(auth_etcd.endpoint,),
        etcd_user="coordinator",
        etcd_password_file=tmp_path / "coordinator",
        listen=f"127.0.0.1:{free_port()}",
        metrics_listen="",
        session_ttl_s=2,
        anonymous_role="admin",
    )
    node = tmp_path / "hv1-node.xml"
    node.write_text(node_xml())
    agent_cfg = AgentConfig(
        host="hv1",
        libvirt_uri=f"test://{node}",
        state_dir=tmp_path / "hv1-state",
        etcd_endpoints=(auth_etcd.endpoint,),
        etcd_user="agent-hv1",
        etcd_password_file=tmp_path / "hv1",
        metrics_listen="",
        resync_interval_s=1.0,
    )
    agent = Agent(agent_cfg)
    task = asyncio.ensure_future(agent.run())
    try:
        async with Coordinator(cfg) as c:
            await eventually(lambda: c.election is not None and c.election.is_leader)
            await asyncio.wait_for(agent.registered.wait(), 15)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{c.api_port}") as ch:
                vms = pb_grpc.VMServiceStub(ch)
                await eventually(lambda: c.cache is not None and "hv1" in c.cache.hosts.records)
                await vms.CreateVMs(
                    pb.CreateVMsRequest(
                        request_id="r1",
                        vms=[pb.VM(scope="acme", name="web-1",
                                   resources=pb.Resources(vcpus=1, memory_mib=256),
                                   image=pb.Image(kernel="/boot/vmlinuz"))],
                    )
                )  # fmt: skip

                async def running() -> bool:
                    view = await vms.GetVM(pb.VMRef(scope="acme", name="web-1"))
                    return bool(view.status.phase == "running")

                await eventually(running, within=20)
            await c.shutdown()
        # The agent's user may write only hv1's keys: etcd refuses hv2's registration.
        imposter = EtcdStore(
            (auth_etcd.endpoint,), "hv2", 2.0,
            auth=EtcdAuth("agent-hv1", tmp_path / "hv1"),
        )  # fmt: skip
        try:
            lease = await imposter.grant(5)
            with pytest.raises(StoreError, match="permission denied"):
                await imposter.put_host(HostInfo(name="hv2"), lease)
        finally:
            await imposter.close()
        assert not task.done(), "the agent died"
    finally:
        await agent.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


async def test_cli_bootstraps_an_etcd_that_serves_tls(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    server = EtcdServer(tls=certs)
    server.start()
    try:
        base = ["--etcd", f"https://127.0.0.1:{server.client_port}", "--etcd-ca",
                str(certs.ca), "--etcd-cert", str(certs.client_cert), "--etcd-key",
                str(certs.client_key), "--root-password-file", str(tmp_path / "root")]  # fmt: skip
        init = ["etcd", "init-auth", *base, "--coordinator-password-file", str(tmp_path / "c")]
        assert await asyncio.to_thread(cli.main, init) == 0
        add = ["etcd", "add-agent", "hv1", *base, "--password-file", str(tmp_path / "hv1")]
        assert await asyncio.to_thread(cli.main, add) == 0
        client = EtcdClient(
            [f"https://127.0.0.1:{server.client_port}"],
            tls=EtcdTLS(ca=certs.ca, cert=certs.client_cert, key=certs.client_key),
            auth=EtcdAuth("agent-hv1", tmp_path / "hv1"),
        )
        try:
            await client.range(rpc.RangeRequest(key=keyspace.CONFIG.encode()), timeout_s=5)
            assert client.logins == 1
        finally:
            await client.close()
    finally:
        server.close()
