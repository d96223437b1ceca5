"""A real etcd over TLS with auth on, bootstrapped as `hvplace etcd init-auth` does, and
agent users whose passwords etcd hashed at a chosen bcrypt cost (a login then takes that
much of etcd's CPU, as on a loaded host)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from hvplace.coordinator.etcd_auth import EtcdAdmin, add_agent, init_auth

from support.etcd import EtcdCerts, EtcdServer, make_certs

ROOT_PASSWORD = "r00t-pw"


def admin(server: EtcdServer, work: Callable[[EtcdAdmin], Awaitable[Any]]) -> None:
    """`work` as root over TLS, with a deadline long enough for slow password hashes."""
    assert server.tls is not None
    certs = server.tls

    async def run() -> None:
        creds = grpc.ssl_channel_credentials(
            certs.ca.read_bytes(), certs.client_key.read_bytes(), certs.client_cert.read_bytes()
        )
        async with grpc.aio.secure_channel(server.endpoint, creds) as channel:
            await work(EtcdAdmin(channel, timeout_s=60))

    asyncio.run(run())


def add_host_user(server: EtcdServer, host: str, password_file: Path) -> None:
    """agent-HOST with a new password written to `password_file`."""
    password = f"{host}-pw"
    password_file.write_text(password + "\n")
    admin(server, lambda a: add_agent(a, ROOT_PASSWORD, host, password))


@contextlib.contextmanager
def auth_etcd(
    directory: Path,
    hosts: tuple[str, ...],
    bcrypt_cost: int | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[tuple[EtcdServer, EtcdCerts]]:
    """A private etcd (TLS with client certificates, auth on, `extra` flags) with users root,
    coordinator and agent-HOST for `hosts` (passwords in `directory`/HOST). With
    `bcrypt_cost`, etcd hashes the agents' passwords at that cost (root's and the
    coordinator's keep the default, so setting up stays quick)."""
    certs = make_certs(directory / "pki")
    server = EtcdServer(tls=certs)
    server.extra_args = list(extra)
    server.start()
    try:
        admin(server, lambda a: init_auth(a, ROOT_PASSWORD, "coordinator-pw"))
        if bcrypt_cost is not None:
            server.stop()
            server.extra_args = [*extra, "--bcrypt-cost", str(bcrypt_cost)]
            server.start()
        for host in hosts:
            add_host_user(server, host, directory / host)
        yield server, certs
    finally:
        server.close()
