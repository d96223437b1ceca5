"""etcd's own access control for hvplace (SPEC §6): a `coordinator` user that may write the
whole keyspace, and per host an `agent-<host>` user whose role may write only that host's
registration and domain status and read its own assignments, migrations and the cluster config."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import grpc
from aetcd import rpc
from hvplace.proto import keyspace
from hvplace.proto.errors import InvalidInput, Unavailable
from hvplace.proto.names import check_name

ROOT_USER = "root"
COORDINATOR = "coordinator"


class Perm(IntEnum):
    # etcd's authpb.Permission.Type values.
    READ = 0
    WRITE = 1
    READWRITE = 2


@dataclass(frozen=True, slots=True)
class Grant:
    perm: Perm
    key: str
    prefix: bool = False

    @property
    def range_end(self) -> str:
        return keyspace.prefix_end(self.key) if self.prefix else ""


def agent_user(host: str) -> str:
    return f"agent-{check_name(host, 'host name')}"


def agent_grants(host: str) -> list[Grant]:
    """What an agent may touch (keyspace.py's writer column): its own keys only."""
    return [
        Grant(Perm.READWRITE, keyspace.host(host)),
        Grant(Perm.READWRITE, keyspace.domains_of(host), prefix=True),
        Grant(Perm.READ, keyspace.assignments_of(host), prefix=True),
        Grant(Perm.READ, keyspace.migrations_of(host), prefix=True),
        Grant(Perm.READ, keyspace.CONFIG),
    ]


def coordinator_grants() -> list[Grant]:
    return [Grant(Perm.READWRITE, keyspace.ROOT, prefix=True)]


def _exists(e: grpc.aio.AioRpcError) -> bool:
    return e.code() == grpc.StatusCode.FAILED_PRECONDITION and "already exist" in (
        e.details() or ""
    )


class EtcdAdmin:
    """The few Auth RPCs hvplace needs, on one channel, as root once auth is on."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 5.0) -> None:
        self._auth = rpc.AuthStub(channel)
        self._timeout = timeout_s
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._root_password: str | None = None

    async def _call(self, method: Any, request: Any, retries: int = 3) -> Any:
        for attempt in range(retries + 1):
            try:
                return await method(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise Unavailable(f"etcd: {e.details()}") from None
                # etcd expires simple tokens (and a fresh one may not be known to the
                # member yet): log in again and retry.
                stale = "invalid auth token" in (e.details() or "")
                if not stale or self._root_password is None or attempt == retries:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
                await self._login(self._root_password)
        raise AssertionError("unreachable")

    async def _login(self, root_password: str) -> None:
        reply = await self._auth.Authenticate(
            rpc.AuthenticateRequest(name=ROOT_USER, password=root_password),
            timeout=self._timeout,
        )
        self._metadata = (("token", reply.token),)

    async def auth_enabled(self, root_password: str) -> bool:
        """True (and logged in as root) when auth is on; False when it is still off."""
        try:
            await self._login(root_password)
        except grpc.aio.AioRpcError as e:
            if "authentication is not enabled" in (e.details() or ""):
                return False
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidInput("etcd auth is on and the root password was refused") from None
            raise
        self._root_password = root_password
        return True

    async def ensure_role(self, name: str, grants: Sequence[Grant]) -> None:
        try:
            await self._call(self._auth.RoleAdd, rpc.AuthRoleAddRequest(name=name))
        except grpc.aio.AioRpcError as e:
            if not _exists(e):
                raise
        for g in grants:
            perm = rpc.Permission(
                permType=int(g.perm), key=g.key.encode(), range_end=g.range_end.encode()
            )
            await self._call(
                self._auth.RoleGrantPermission,
                rpc.AuthRoleGrantPermissionRequest(name=name, perm=perm),
            )

    async def ensure_user(self, name: str, password: str, role: str) -> bool:
        """Create the user (True) or set its password (False, it existed); grant `role`."""
        try:
            await self._call(
                self._auth.UserAdd, rpc.AuthUserAddRequest(name=name, password=password)
            )
            created = True
        except grpc.aio.AioRpcError as e:
            if not _exists(e):
                raise
            await self._call(
                self._auth.UserChangePassword,
                rpc.AuthUserChangePasswordRequest(name=name, password=password),
            )
            created = False
        await self._call(
            self._auth.UserGrantRole, rpc.AuthUserGrantRoleRequest(user=name, role=role)
        )
        return created

    async def enable(self) -> None:
        await self._call(self._auth.AuthEnable, rpc.AuthEnableRequest())


async def init_auth(admin: EtcdAdmin, root_password: str, coordinator_password: str) -> bool:
    """Idempotent: root and coordinator users with their roles, then auth on. Returns
    whether auth was already on."""
    already = await admin.auth_enabled(root_password)
    await admin.ensure_user(ROOT_USER, root_password, "root")
    await admin.ensure_role(COORDINATOR, coordinator_grants())
    await admin.ensure_user(COORDINATOR, coordinator_password, COORDINATOR)
    if not already:
        await admin.enable()
    return already


async def add_agent(admin: EtcdAdmin, root_password: str, host: str, password: str) -> str:
    """The host's user and role (created, or updated to these grants and password)."""
    if not await admin.auth_enabled(root_password):
        raise InvalidInput("etcd auth is off: run `hvplace etcd init-auth` first")
    user = agent_user(host)
    await admin.ensure_role(user, agent_grants(host))
    await admin.ensure_user(user, password, user)
    return user


def new_password() -> str:
    return secrets.token_urlsafe(24)
