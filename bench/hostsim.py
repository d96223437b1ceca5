"""Bench-only host simulator: many test hosts in one process, through the agent's etcd keys.

Each simulated host registers its HostInfo on its own lease and renews it, and reports every
VM assigned to it as a running domain (DomainStatus on that lease) as soon as the assignment
appears, as an agent on libvirt's test:/// driver would a moment later. It runs no
reconciler and no libvirt: it stands in for the receiving side of a failover at a scale
(hundreds of hosts) that real agent processes cannot reach on a 2-core machine. Killing
this process with SIGKILL is a real failure: its leases expire in etcd.

    python bench/hostsim.py --endpoint URL --first 41 --count 160 --ttl 5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from hvplace.coordinator.store import Store
from hvplace.proto import codec, keyspace
from hvplace.proto.records import Assignment, DomainState, DomainStatus, HostInfo, Resources
from hvplace.runtime.etcd import EtcdAuth, EtcdTLS


def sim_name(index: int) -> str:
    return f"s{index:04d}"


class Simulator:
    def __init__(self, store: Store, names: list[str], ttl: float, rack_size: int) -> None:
        self.store = store
        self.names = names
        self.ttl = ttl
        self.rack_size = rack_size
        self.leases: dict[str, int] = {}

    async def register(self) -> None:
        for i, name in enumerate(self.names):
            lease = await self.store.grant(self.ttl)
            info = HostInfo(
                name=name,
                labels={"rack": f"sim{i // self.rack_size:03d}", "zone": ("east", "west")[i % 2]},
                capacity=Resources(vcpus=64, memory_mib=262144, disk_gib=1000),
                libvirt_uri="sim://",
                agent_version="hostsim",
                started_at=time.time(),
            )
            await self.store.put(keyspace.host(name), codec.dumps(info), lease=lease)
            self.leases[name] = lease

    async def keep(self) -> None:
        slots = asyncio.Semaphore(32)

        async def one(lease: int) -> None:
            async with slots:
                await self.store.keepalive(lease, timeout_s=self.ttl / 3)

        while True:
            started = time.monotonic()
            await asyncio.gather(*(one(lease) for lease in self.leases.values()))
            await asyncio.sleep(max(0.0, self.ttl / 3 - (time.monotonic() - started)))

    async def report(self, changes: list[tuple[str, bool, bytes]]) -> None:
        """(assignment key, put?, value) -> domain records on each host's own lease."""
        per_host: dict[str, tuple[dict[str, bytes], list[str]]] = {}
        now = time.time()
        for key, put, value in changes:
            k = keyspace.classify(key)
            host, scope, name = k.host, k.scope, k.name
            if host not in self.leases:
                continue
            puts, deletes = per_host.setdefault(host, ({}, []))
            domain_key = keyspace.domain(host, scope, name)
            if put:
                a = codec.loads(Assignment, value)
                status = DomainStatus(
                    scope=scope,
                    name=name,
                    host=host,
                    uid=a.vm.uid,
                    epoch=a.epoch,
                    state=DomainState.RUNNING,
                    since=now,
                )
                puts[domain_key] = codec.dumps(status)
            else:
                deletes.append(domain_key)
        for host, (puts, deletes) in per_host.items():
            await self.store.commit([], puts, deletes, fence=None, lease=self.leases[host])

    async def follow(self, ready: asyncio.Event) -> None:
        kvs, revision = await self.store.list_prefix(keyspace.ASSIGNMENTS)
        await self.report([(kv.key, True, kv.value) for kv in kvs])
        ready.set()
        stream = await self.store.watch(keyspace.ASSIGNMENTS, revision + 1)
        async for batch in stream:
            await self.report([(e.key, e.type == "put", e.value) for e in batch.events])


async def main_async(args: argparse.Namespace) -> None:
    tls = EtcdTLS(ca=Path(args.ca)) if args.ca else None
    auth = EtcdAuth(user=args.user, password_file=Path(args.password_file)) if args.user else None
    store = await Store.connect([args.endpoint], timeout=30, tls=tls, auth=auth)
    names = [sim_name(i) for i in range(args.first, args.first + args.count)]
    sim = Simulator(store, names, args.ttl, args.rack_size)
    await sim.register()
    ready = asyncio.Event()
    tasks = [asyncio.create_task(sim.keep()), asyncio.create_task(sim.follow(ready))]
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait({waiting, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        if t.done():
            t.result()
    print("ready", flush=True)
    await asyncio.gather(*tasks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--first", type=int, default=1)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--ttl", type=float, default=5.0)
    p.add_argument("--rack-size", type=int, default=20)
    p.add_argument("--ca", help="etcd's CA (https:// endpoints)")
    p.add_argument("--user", default="", help="etcd user (auth on)")
    p.add_argument("--password-file", help="that user's password file")
    asyncio.run(main_async(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
