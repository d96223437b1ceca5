"""The etcd client over a slow link: a TLS connection whose handshake takes longer than
gRPC's reconnect backoff still gets made (gRPC gives each connection attempt
max(backoff, `grpc.min_reconnect_backoff_ms`) before it abandons it and starts over)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aetcd import rpc
from hvplace.runtime.etcd import EtcdClient, EtcdTLS
from support.etcd import EtcdCerts, EtcdServer, make_certs

ONE_WAY_S = 0.25
"""Every byte takes this long each way: a 500 ms round trip, so a TLS connection (TLS 1.3
and HTTP/2's SETTINGS: two round trips) needs about a second to come up."""


class SlowLink:
    """A TCP relay on loopback to `target` that delivers every chunk ONE_WAY_S late, in
    order: a long link, or a server too busy to answer quickly."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target)
        pumps = [
            asyncio.ensure_future(self._pump(client_r, server_w)),
            asyncio.ensure_future(self._pump(server_r, client_w)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for writer in (client_w, server_w):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not chunk:
                    writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while chunk := await reader.read(65536):
                queue.put_nowait((loop.time() + ONE_WAY_S, chunk))
            queue.put_nowait((loop.time() + ONE_WAY_S, b""))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[EtcdServer, EtcdCerts]]:
    certs = make_certs(tmp_path / "certs")
    server = EtcdServer(tls=certs)
    try:
        server.start()
        yield server, certs
    finally:
        server.close()


@pytest.fixture
async def slow_link(tls_etcd: tuple[EtcdServer, EtcdCerts]) -> AsyncIterator[SlowLink]:
    link = SlowLink(tls_etcd[0].client_port)
    await link.start()
    try:
        yield link
    finally:
        await link.close()


async def test_a_tls_connection_slower_than_the_backoff_is_made(
    tls_etcd: tuple[EtcdServer, EtcdCerts], slow_link: SlowLink
) -> None:
    _, certs = tls_etcd
    client = EtcdClient(
        [f"https://127.0.0.1:{slow_link.port}"],
        tls=EtcdTLS(ca=certs.ca, cert=certs.client_cert, key=certs.client_key),
    )
    try:
        await client.put(rpc.PutRequest(key=b"/slow-link", value=b"1"), timeout_s=20)
        reply = await client.range(rpc.RangeRequest(key=b"/slow-link"), timeout_s=20)
        assert reply.kvs[0].value == b"1"
    finally:
        await client.close()
