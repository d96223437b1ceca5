"""The agent's etcd seam: its lease, its host and domain keys, its assignments and the cluster config.

It writes only `hosts/<host>` and `domains/<host>/...`, both on its lease (keyspace.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aetcd import rpc
from hvplace.proto import keyspace
from hvplace.proto.codec import dumps, loads
from hvplace.proto.errors import InvalidInput, Unavailable
from hvplace.proto.records import Assignment, ClusterConfig, DomainStatus, HostInfo, Migration
from hvplace.runtime.etcd import Compacted, EtcdAuth, EtcdClient, EtcdTLS

log = logging.getLogger(__name__)


class StoreError(Unavailable):
    """etcd could not be reached or refused a request."""


@dataclass(frozen=True, slots=True)
class Assignments:
    """This host's assignments at one revision; malformed records are kept as errors."""

    revision: int
    valid: dict[str, Assignment] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)


def _prefix(prefix: str) -> tuple[bytes, bytes]:
    return prefix.encode(), keyspace.prefix_end(prefix).encode()


class EtcdStore:
    """The agent's keys over hvplace.runtime.etcd's client (every configured member, moving
    to another when one fails). Every call is bounded by `timeout_s`, failover included,
    so a frozen etcd never stalls the agent (the lease keeper measures that and fences)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        host: str,
        timeout_s: float = 2.0,
        *,
        tls: EtcdTLS | None = None,
        auth: EtcdAuth | None = None,
    ) -> None:
        self.host = host
        self._timeout = timeout_s
        self.etcd = EtcdClient(endpoints, tls=tls, auth=auth)

    async def close(self) -> None:
        await self.etcd.close()

    async def _do(self, what: str, call: Any) -> Any:
        try:
            return await call
        except Unavailable as e:
            raise StoreError(f"{what}: {e.message}") from None

    # -- lease -------------------------------------------------------------------------

    async def grant(self, ttl_s: float) -> int:
        req = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl_s)))
        resp = await self._do(
            "etcd lease grant", self.etcd.lease_grant(req, timeout_s=self._timeout)
        )
        if resp.error:
            raise StoreError(f"etcd refused a lease: {resp.error}")
        return int(resp.ID)

    async def keepalive(self, lease_id: int, timeout_s: float) -> int:
        """The lease's remaining TTL after a renewal; 0 means etcd no longer has it."""
        return int(
            await self._do("etcd lease renewal", self.etcd.keepalive(lease_id, timeout_s=timeout_s))
        )

    async def revoke(self, lease_id: int) -> None:
        req = rpc.LeaseRevokeRequest(ID=lease_id)
        await self._do("etcd lease revoke", self.etcd.lease_revoke(req, timeout_s=self._timeout))

    # -- own keys ----------------------------------------------------------------------

    async def _put(self, key: str, value: bytes, lease_id: int) -> None:
        req = rpc.PutRequest(key=key.encode(), value=value, lease=lease_id)
        await self._do(f"etcd put {key}", self.etcd.put(req, timeout_s=self._timeout))

    async def _range(self, key: str, *, prefix: bool) -> Any:
        start, end = _prefix(key) if prefix else (key.encode(), b"")
        req = rpc.RangeRequest(key=start, range_end=end)
        return await self._do(f"etcd get {key}", self.etcd.range(req, timeout_s=self._timeout))

    async def put_host(self, info: HostInfo, lease_id: int) -> None:
        await self._put(keyspace.host(self.host), dumps(info), lease_id)

    async def put_domain(self, status: DomainStatus, lease_id: int) -> None:
        await self._put(
            keyspace.domain(self.host, status.scope, status.name), dumps(status), lease_id
        )

    async def delete_domain(self, scope: str, name: str) -> None:
        key = keyspace.domain(self.host, scope, name)
        req = rpc.DeleteRangeRequest(key=key.encode())
        await self._do(f"etcd delete {key}", self.etcd.delete_range(req, timeout_s=self._timeout))

    async def domain_keys(self) -> dict[str, DomainStatus]:
        prefix = keyspace.domains_of(self.host)
        rng = await self._range(prefix, prefix=True)
        out: dict[str, DomainStatus] = {}
        for kv in rng.kvs:
            k = keyspace.classify(kv.key.decode())
            scope, name = k.scope, k.name.split("/")[0]
            try:
                out[f"{scope}/{name}"] = loads(DomainStatus, kv.value)
            except InvalidInput:
                out[f"{scope}/{name}"] = DomainStatus(scope=scope, name=name, host=self.host)
        return out

    # -- reads -------------------------------------------------------------------------

    async def cluster_config(self) -> ClusterConfig | None:
        rng = await self._range(keyspace.CONFIG, prefix=False)
        return loads(ClusterConfig, rng.kvs[0].value) if rng.kvs else None

    async def assignments(self) -> Assignments:
        prefix = keyspace.assignments_of(self.host)
        rng = await self._range(prefix, prefix=True)
        result = Assignments(revision=int(rng.header.revision))
        for kv in rng.kvs:
            key = keyspace.classify(kv.key.decode()).id
            if key.count("/") != 1:
                log.warning("ignoring odd assignment key %s", kv.key.decode())
                continue
            try:
                result.valid[key] = loads(Assignment, kv.value)
            except InvalidInput as e:
                result.invalid[key] = f"assignment record {key}: {e.message}"
        return result

    async def migrations(self) -> dict[str, Migration]:
        """Live migrations from or to this host, by `scope/vm` (a malformed record is
        skipped: without it the agent acts as if no migration were in flight)."""
        prefix = keyspace.migrations_of(self.host)
        rng = await self._range(prefix, prefix=True)
        out: dict[str, Migration] = {}
        for kv in rng.kvs:
            key = keyspace.classify(kv.key.decode()).id
            try:
                out[key] = loads(Migration, kv.value)
            except InvalidInput as e:
                log.warning("ignoring migration record %s: %s", key, e.message)
        return out

    def watch_migrations(self) -> AsyncIterator[None]:
        return self.watch_assignments(keyspace.migrations_of(self.host))

    async def watch_assignments(self, prefix: str = "") -> AsyncIterator[None]:
        """Yields once per batch of changes to this host's assignments (level-triggered:
        the caller re-reads everything). When the member under the watch fails, the watch
        resumes on another from the last revision it showed, so nothing is missed; raises
        StoreError when no member takes it."""
        start, end = _prefix(prefix or keyspace.assignments_of(self.host))
        revision = 0  # the last revision the watch has shown (0: none yet, start from now)
        breaks = 0
        while True:
            try:
                stream = await self.etcd.watch(
                    start, end, revision + 1 if revision else 0, timeout_s=self._timeout
                )
            except Compacted:
                revision = 0  # history gone: the caller's re-read covers the gap
                yield None
                continue
            except Unavailable as e:
                raise StoreError(f"etcd watch: {e.message}") from None
            revision = stream.revision
            try:
                async for batch in stream:
                    breaks = 0
                    revision = batch.revision
                    if batch.events:
                        yield None
            except Compacted:
                revision = 0
                yield None
            except Unavailable as e:
                breaks += 1
                if breaks > len(self.etcd.endpoints):
                    raise StoreError(f"etcd watch broke: {e.message}") from None
                log.info("assignment watch: %s; resuming after revision %d", e.message, revision)
            finally:
                await stream.close()
