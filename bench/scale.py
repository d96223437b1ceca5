"""Scale check of the coordinator's memory and cache rebuild: loads N hosts and M VMs with their
assignments into a private etcd, then starts a coordinator in a child process and reports
one JSON line: hosts, vms, rss_mb (goal <= 300) and rebuild_s (its list of etcd).

    /work/venv/bin/python bench/scale.py --json [--hosts 10000] [--vms 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hvplace.coordinator.store import Store
from hvplace.proto import codec, keyspace
from hvplace.proto.records import VM, Assignment, HostInfo, Phase, Resources, VMStatus

OPS_PER_TXN = 1000


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def load(endpoint: str, n_hosts: int, n_vms: int) -> None:
    store = await Store.connect([endpoint], timeout=60)
    lease = await store.grant(3600)
    zones = ("east", "west", "north")
    hosts = [
        HostInfo(
            name=f"hv{i:05d}",
            labels={"zone": zones[i % 3], "rack": f"r{i // 40:03d}"},
            capacity=Resources(vcpus=64, memory_mib=262144, disk_gib=4000),
        )
        for i in range(n_hosts)
    ]
    for i in range(0, n_hosts, OPS_PER_TXN):
        puts = {keyspace.host(h.name): codec.dumps(h) for h in hosts[i : i + OPS_PER_TXN]}
        await store.commit([], puts, fence=None, lease=lease)
    per_txn = OPS_PER_TXN // 3
    for i in range(0, n_vms, per_txn):
        puts = {}
        for j in range(i, min(n_vms, i + per_txn)):
            scope = f"tenant{j % 500:03d}"
            vm = VM(
                scope=scope,
                name=f"vm{j:06d}",
                uid=f"u{j:06d}",
                labels={"app": f"app{j % 50}", "tier": ("web", "db", "cache")[j % 3]},
                resources=Resources(vcpus=2, memory_mib=4096, disk_gib=20),
                created_at=1.7e9,
            )
            host = hosts[j % n_hosts].name
            puts[keyspace.vm(scope, vm.name)] = codec.dumps(vm)
            puts[keyspace.assignment(host, scope, vm.name)] = codec.dumps(
                Assignment(vm=vm, host=host, epoch=1)
            )
            status = VMStatus(scope=scope, name=vm.name, phase=Phase.SCHEDULED, host=host, epoch=1)
            puts[keyspace.vm_status(scope, vm.name)] = codec.dumps(status)
        await store.commit([], puts, fence=None)
    await store.close()


async def child(endpoint: str) -> None:
    """A whole coordinator (cache, election, controller, metrics; no gRPC port) on the
    loaded etcd: time to ready (its cache rebuilt), then its RSS once it leads."""
    from hvplace.coordinator.config import CoordinatorConfig
    from hvplace.coordinator.daemon import Coordinator

    cfg = CoordinatorConfig(
        node_name="bench", etcd_endpoints=(endpoint,), listen="", metrics_listen=""
    )
    started = time.perf_counter()
    async with Coordinator(cfg) as c:
        rebuild = time.perf_counter() - started
        assert c.cache is not None and c.election is not None
        while not c.election.is_leader:  # noqa: ASYNC110 - no event for it
            await asyncio.sleep(0.1)
        snap_started = time.perf_counter()
        snap = c.cache.snapshot()
        snapshot_s = time.perf_counter() - snap_started
        await asyncio.sleep(2)  # the controller's first pass (nothing to place)
        print(
            json.dumps(
                {
                    "hosts": len(snap.hosts),
                    "vms": len(snap.vms),
                    "assignments": len(snap.placements),
                    "rss_mb": round(_rss_mb(), 1),
                    "rebuild_s": round(rebuild, 2),
                    "snapshot_s": round(snapshot_s, 2),
                }
            )
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=10_000)
    p.add_argument("--vms", type=int, default=100_000)
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        asyncio.run(child(args.child))
        return 0
    from support.etcd import EtcdServer

    etcd = EtcdServer()
    etcd.start()
    try:
        t0 = time.perf_counter()
        asyncio.run(load(etcd.endpoint, args.hosts, args.vms))
        load_s = time.perf_counter() - t0
        if not args.json:
            print(f"loaded {args.hosts} hosts, {args.vms} VMs in {load_s:.1f}s", file=sys.stderr)
        out = subprocess.run(
            [sys.executable, __file__, "--child", etcd.endpoint],
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        if out.returncode != 0:
            print(out.stdout, out.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["load_s"] = round(load_s, 1)
        print(json.dumps(result))
    finally:
        etcd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
