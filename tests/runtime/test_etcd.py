"""The etcd seam: endpoint parsing, and failover on a real 3-member cluster by kill -9."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aetcd import rpc
from hvplace.proto import keyspace
from hvplace.proto.errors import InvalidInput, Unavailable
from hvplace.runtime.etcd import (
    Endpoint,
    EtcdClient,
    EtcdTLS,
    WatchBatch,
    parse_endpoint,
    parse_endpoints,
)
from support.etcd import EtcdCerts, EtcdCluster, EtcdServer, make_certs, members_connected_from

K = "/hvplace/v1/test/"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:2379", Endpoint("http", "127.0.0.1", 2379)),
        ("http://10.0.0.1:2379", Endpoint("http", "10.0.0.1", 2379)),
        ("https://etcd-1.example.org:2379/", Endpoint("https", "etcd-1.example.org", 2379)),
        ("localhost", Endpoint("http", "localhost", 2379)),
        ("[::1]:2379", Endpoint("http", "::1", 2379)),
        ("https://[fd00::5]:12379", Endpoint("https", "fd00::5", 12379)),
        (" etcd.local:1 ", Endpoint("http", "etcd.local", 1)),
    ],
)
def test_endpoints_parse(text: str, want: Endpoint) -> None:
    assert parse_endpoint(text) == want


def test_endpoint_targets() -> None:
    assert parse_endpoint("[::1]:2379").target == "[::1]:2379"
    assert str(parse_endpoint("h:1")) == "http://h:1"
    assert str(parse_endpoint("https://h:1")) == "https://h:1"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("ftp://h:1", "scheme must be http or https"),
        ("unix:///run/etcd.sock", "scheme must be http or https"),
        ("h:99999", "out of range"),
        ("h:x", "could not be cast"),
        ("::1:2379", "IPv6 addresses go in brackets"),
        ("h:0", "port 0"),
        ("http://h:1/v3", "nothing else"),
        ("http://user:pw@h:1", "nothing else"),
        ("bad_host:1", "neither a DNS name nor an IP address"),
        ("-h:1", "neither a DNS name nor an IP address"),
        ("http://:1", "no host"),
    ],
)
def test_bad_endpoints_are_clear_errors(text: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        parse_endpoint(text)


def test_endpoint_lists() -> None:
    with pytest.raises(InvalidInput, match="no etcd endpoint"):
        parse_endpoints([])
    with pytest.raises(InvalidInput, match="mix http:// and https://"):
        parse_endpoints(["http://a:1", "https://b:1"])
    with pytest.raises(InvalidInput, match="listed twice"):
        parse_endpoints(["a:1", "http://a:1"])
    with pytest.raises(InvalidInput, match="x" * 100 + "'"):
        parse_endpoint("x" * 5000 + ":1")  # the message quotes at most 100 characters


def test_https_is_kept_and_tls_files_are_checked(tmp_path: Path) -> None:
    assert EtcdClient(["https://localhost:2379"]).endpoints[0].secure
    ca = tmp_path / "ca.pem"
    with pytest.raises(InvalidInput, match="must be https://"):
        EtcdClient(["http://localhost:2379"], tls=EtcdTLS(ca=ca))
    with pytest.raises(InvalidInput, match="give both or neither"):
        EtcdClient(["https://localhost:2379"], tls=EtcdTLS(cert=ca))
    with pytest.raises(InvalidInput, match=f"etcd_ca {ca}: No such file"):
        EtcdClient(["https://localhost:2379"], tls=EtcdTLS(ca=ca))


async def test_https_to_a_plain_member_is_not_downgraded(etcd: EtcdServer) -> None:
    """https:// means TLS: against a plaintext member the handshake fails, clearly."""
    client = EtcdClient([f"https://localhost:{etcd.client_port}"])
    try:
        with pytest.raises(Unavailable, match="https://localhost"):
            await client.range(rpc.RangeRequest(key=b"x"), timeout_s=2)
    finally:
        await client.close()
    plain = EtcdClient([f"http://localhost:{etcd.client_port}"])
    try:
        await plain.range(rpc.RangeRequest(key=b"x"), timeout_s=2)
    finally:
        await plain.close()


def _client(members: list[EtcdServer]) -> EtcdClient:
    # By DNS name: every member is reached as localhost:<port>; the first is used first.
    return EtcdClient([f"localhost:{m.client_port}" for m in members])


@pytest.fixture
async def client(etcd_cluster: EtcdCluster) -> AsyncIterator[EtcdClient]:
    """A client that starts on a follower (killing the leader is its own test)."""
    leader = etcd_cluster.leader()
    c = _client(sorted(etcd_cluster.members, key=lambda m: m is leader))
    try:
        yield c
    finally:
        await c.close()


def _put(key: str, value: str) -> rpc.PutRequest:
    return rpc.PutRequest(key=(K + key).encode(), value=value.encode())


async def _next_events(stream: AsyncIterator[WatchBatch], want: int) -> list[str]:
    got: list[str] = []
    while len(got) < want:
        batch = await asyncio.wait_for(stream.__anext__(), 5)
        got += [e.key.removeprefix(K) for e in batch.events]
    return got


async def test_kill_the_member_in_use(etcd_cluster: EtcdCluster, client: EtcdClient) -> None:
    """kill -9 of the member (a follower) the client uses: the next keepalive and write
    succeed on another member, the lease is the same one, and a watch reopened from the
    last revision it showed sees every event, those written while it was broken too."""
    grant = await client.lease_grant(rpc.LeaseGrantRequest(TTL=5), timeout_s=2)
    lease = int(grant.ID)
    await client.put(rpc.PutRequest(key=(K + "held").encode(), lease=lease), timeout_s=2)
    start, end = K.encode(), keyspace.prefix_end(K).encode()
    stream = await client.watch(start, end, 0, timeout_s=2)
    await client.put(_put("a", "1"), timeout_s=2)
    assert await _next_events(stream, 1) == ["a"]
    seen = stream.revision

    victim = etcd_cluster.member_on_port(client.current.port)
    assert members_connected_from(etcd_cluster) == [victim]
    killed = time.monotonic()
    victim.kill()
    assert await client.keepalive(lease, timeout_s=2) > 0
    renewed_s = time.monotonic() - killed
    # A Txn is never re-sent after an ambiguous failure, but one that never reached the
    # dead member (the connection was refused) goes to the next.
    txn = rpc.TxnRequest(success=[rpc.RequestOp(request_put=_put("b", "2"))])
    assert (await client.txn(txn, timeout_s=2)).succeeded
    assert client.current.port != victim.client_port
    with pytest.raises(Unavailable):
        await _next_events(stream, 1)  # the stream was on the dead member
    await stream.close()
    await client.put(_put("c", "3"), timeout_s=2)
    resumed = await client.watch(start, end, seen + 1, timeout_s=2)
    assert await _next_events(resumed, 2) == ["b", "c"]
    await resumed.close()
    ttl = await client.unary(
        lambda m: m.lease.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=lease), timeout_s=2
    )
    assert ttl.TTL > 0
    assert client.failovers >= 1
    print(f"kill -9 of the member in use -> lease renewed through another in {renewed_s:.3f}s")


async def test_a_dead_member_is_skipped_and_rejoins(
    etcd_cluster: EtcdCluster, client: EtcdClient
) -> None:
    """Members die and come back in turn (a follower, then maybe the leader): calls go to
    whichever answers."""
    leader = etcd_cluster.leader()
    first, second, third = sorted(etcd_cluster.members, key=lambda m: m is leader)
    await client.put(_put("x", "1"), timeout_s=2)
    first.kill()
    await client.put(_put("x", "2"), timeout_s=2)
    first.start()
    etcd_cluster.etcdctl("endpoint", "health", "--cluster")
    second.kill()
    # Should `second` have led, the others first elect a leader (1-2 s here).
    got = await client.range(rpc.RangeRequest(key=(K + "x").encode()), timeout_s=10)
    assert got.kvs[0].value == b"2"
    second.start()
    assert third.proc is not None


async def test_no_member_answers(etcd_cluster: EtcdCluster, client: EtcdClient) -> None:
    """Two of three dead: no quorum; calls fail within their timeout, as Unavailable."""
    etcd_cluster.members[0].kill()
    etcd_cluster.members[1].kill()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable, match="etcd"):
        await client.put(_put("y", "1"), timeout_s=1.0)
    assert loop.time() - started < 1.5


async def test_kill_the_leader_in_use(etcd_cluster: EtcdCluster) -> None:
    """kill -9 of the member the client uses when it is raft's leader: the others elect a
    new one (etcd's election timeout, 1 s by default), meanwhile every member refuses; the
    client keeps trying them and the lease, extended by the new leader, is the same."""
    leader = etcd_cluster.leader()
    client = _client(sorted(etcd_cluster.members, key=lambda m: m is not leader))
    try:
        lease = int((await client.lease_grant(rpc.LeaseGrantRequest(TTL=5), timeout_s=2)).ID)
        assert client.current.port == leader.client_port
        killed = time.monotonic()
        leader.kill()
        ttl = 0
        while not ttl and time.monotonic() - killed < 10:
            try:
                ttl = await client.keepalive(lease, timeout_s=0.5)  # as an agent renews
            except Unavailable:
                await asyncio.sleep(0.1)
        renewed_s = time.monotonic() - killed
        assert ttl > 0
        assert client.current.port != leader.client_port
    finally:
        await client.close()
    print(f"kill -9 of the leader in use -> lease renewed through another in {renewed_s:.3f}s")


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdCerts]]:
    """A member that serves only TLS and wants a client certificate from our CA."""
    certs = make_certs(tmp_path / "certs")
    server = EtcdServer(tls=certs)
    try:
        server.start()
        yield server, certs
    finally:
        server.close()


async def test_https_with_ca_cert_and_key(tls_etcd: tuple[EtcdServer, EtcdCerts]) -> None:
    """The TLS settings both daemons take (etcd_ca, etcd_cert, etcd_key) reach a member
    that requires client certificates, by name; without the client certificate, or over
    plain http, it refuses, and the error says which member."""
    server, certs = tls_etcd
    url = f"https://localhost:{server.client_port}"
    full = EtcdTLS(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    client = EtcdClient([url], tls=full)
    try:
        await client.put(_put("tls", "1"), timeout_s=5)
        got = await client.range(rpc.RangeRequest(key=(K + "tls").encode()), timeout_s=5)
        assert got.kvs[0].value == b"1"
    finally:
        await client.close()
    for endpoint, tls in ((url, EtcdTLS(ca=certs.ca)), (url.replace("https", "http"), None)):
        refused = EtcdClient([endpoint], tls=tls)
        try:
            with pytest.raises(Unavailable, match=f"localhost:{server.client_port}"):
                await refused.range(rpc.RangeRequest(key=b"x"), timeout_s=1)
        finally:
            await refused.close()
