"""The agent's etcd seam: its lease, its host and domain keys, its assignments and the cluster config.

It writes only `hosts/<host>` and `domains/<host>/...`, both on its lease (keyspace.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aetcd
from hvplace.proto import keyspace
from hvplace.proto.errors import InvalidInput, Unavailable
from hvplace.proto.etcd_channel import RECONNECT_OPTIONS
from hvplace.proto.models import Assignment, ClusterConfig, DomainStatus, HostInfo, dumps, loads

log = logging.getLogger(__name__)


class StoreError(Unavailable):
    """etcd could not be reached or refused a request."""


@dataclass(frozen=True, slots=True)
class Assignments:
    """This host's assignments at one revision; malformed records are kept as errors."""

    revision: int
    valid: dict[str, Assignment] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("http://").rpartition(":")
    return host or "127.0.0.1", int(port or 2379)


class EtcdStore:
    """One aetcd client; every unary call is bounded by `timeout_s` so a frozen etcd
    never stalls the agent (the lease keeper measures that stall and fences)."""

    def __init__(self, endpoints: tuple[str, ...], host: str, timeout_s: float = 2.0) -> None:
        self.host = host
        self._endpoints = endpoints
        self._timeout = timeout_s
        self._next = 0
        self._client: Any = None

    def _make_client(self) -> Any:
        host, port = _split_endpoint(self._endpoints[self._next % len(self._endpoints)])
        return aetcd.Client(
            host=host,
            port=port,
            timeout=math.ceil(self._timeout),
            options=dict(RECONNECT_OPTIONS),
        )

    async def _bounded(self, coro: Any) -> Any:
        if self._client is None:
            self._client = self._make_client()
        try:
            return await asyncio.wait_for(coro(self._client), self._timeout)
        except (TimeoutError, aetcd.ClientError) as e:
            raise StoreError(f"etcd: {type(e).__name__} {e}".strip()) from None

    async def rotate(self) -> None:
        """After failures: a fresh client on the next endpoint."""
        old, self._client = self._client, None
        self._next += 1
        if old is not None:
            try:
                await asyncio.wait_for(old.close(), self._timeout)
            except Exception:
                log.debug("closing an etcd client failed", exc_info=True)

    async def close(self) -> None:
        old, self._client = self._client, None
        if old is not None:
            try:
                await asyncio.wait_for(old.close(), self._timeout)
            except Exception:
                log.debug("closing the etcd client failed", exc_info=True)

    # -- lease -------------------------------------------------------------------------

    async def grant(self, ttl_s: float) -> int:
        lease = await self._bounded(lambda c: c.lease(max(1, math.ceil(ttl_s))))
        return int(lease.id)

    async def keepalive(self, lease_id: int, timeout_s: float) -> int:
        """The lease's remaining TTL after a renewal; 0 means etcd no longer has it."""
        if self._client is None:
            self._client = self._make_client()
        client = self._client
        try:
            reply = await asyncio.wait_for(client.refresh_lease(lease_id), timeout_s)
        except (TimeoutError, aetcd.ClientError) as e:
            raise StoreError(f"etcd lease renewal: {type(e).__name__} {e}".strip()) from None
        return int(reply.TTL) if reply is not None else 0

    async def revoke(self, lease_id: int) -> None:
        await self._bounded(lambda c: c.revoke_lease(lease_id))

    # -- own keys ----------------------------------------------------------------------

    async def put_host(self, info: HostInfo, lease_id: int) -> None:
        key = keyspace.host(self.host).encode()
        await self._bounded(lambda c: c.put(key, dumps(info), lease=lease_id))

    async def put_domain(self, status: DomainStatus, lease_id: int) -> None:
        key = keyspace.domain(self.host, status.scope, status.name).encode()
        await self._bounded(lambda c: c.put(key, dumps(status), lease=lease_id))

    async def delete_domain(self, scope: str, name: str) -> None:
        key = keyspace.domain(self.host, scope, name).encode()
        await self._bounded(lambda c: c.delete(key))

    async def domain_keys(self) -> dict[str, DomainStatus]:
        prefix = keyspace.domains_of(self.host)
        rng = await self._bounded(lambda c: c.get_prefix(prefix.encode()))
        out: dict[str, DomainStatus] = {}
        for kv in rng:
            scope, name = keyspace.split(kv.key.decode(), prefix)[:2]
            try:
                out[f"{scope}/{name}"] = loads(DomainStatus, kv.value)
            except InvalidInput:
                out[f"{scope}/{name}"] = DomainStatus(scope=scope, name=name, host=self.host)
        return out

    # -- reads -------------------------------------------------------------------------

    async def cluster_config(self) -> ClusterConfig | None:
        got = await self._bounded(lambda c: c.get(keyspace.CONFIG.encode()))
        return None if got is None else loads(ClusterConfig, got.value)

    async def assignments(self) -> Assignments:
        prefix = keyspace.assignments_of(self.host)
        rng = await self._bounded(lambda c: c.get_prefix(prefix.encode()))
        result = Assignments(revision=int(rng.header.revision) if rng.header else 0)
        for kv in rng:
            parts = keyspace.split(kv.key.decode(), prefix)
            if len(parts) != 2:
                log.warning("ignoring odd assignment key %s", kv.key.decode())
                continue
            key = "/".join(parts)
            try:
                result.valid[key] = loads(Assignment, kv.value)
            except InvalidInput as e:
                result.invalid[key] = f"assignment record {key}: {e.message}"
        return result

    async def watch_assignments(self) -> AsyncIterator[None]:
        """Yields once per batch of changes to this host's assignments (level-triggered:
        the caller re-reads everything); raises StoreError when the watch breaks."""
        if self._client is None:
            self._client = self._make_client()
        client = self._client
        prefix = keyspace.assignments_of(self.host).encode()
        try:
            watch = await asyncio.wait_for(client.watch_prefix(prefix), self._timeout)
        except (TimeoutError, aetcd.ClientError) as e:
            raise StoreError(f"etcd watch: {type(e).__name__} {e}".strip()) from None
        try:
            async for _event in watch:
                yield None
        except aetcd.ClientError as e:
            raise StoreError(f"etcd watch broke: {e}") from None
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), self._timeout)
            except Exception:
                log.debug("cancelling the assignment watch failed", exc_info=True)
