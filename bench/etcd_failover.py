"""How long a lease goes unrenewed when the etcd member in use is killed (kill -9).

Starts a 3-member etcd on loopback, then per trial: a client (hvplace.runtime.etcd, as both
daemons use it) renews a lease through the member it uses, that member is killed, and the
client renews as an agent does (attempts bounded by 0.5 s, 0.1 s apart) until one
succeeds; the member is restarted before the next trial. `--role follower` kills a
follower in use, `--role leader` raft's leader in use (the others elect a new one first).
Prints one JSON line per role. Run: python bench/etcd_failover.py --trials 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from aetcd import rpc
from hvplace.proto.errors import Unavailable
from hvplace.runtime.etcd import EtcdClient
from support.etcd import EtcdCluster


async def trial(cluster: EtcdCluster, role: str) -> float:
    leader = cluster.leader()
    members = sorted(cluster.members, key=lambda m: (m is leader) == (role == "follower"))
    client = EtcdClient([m.endpoint for m in members])
    try:
        lease = int((await client.lease_grant(rpc.LeaseGrantRequest(TTL=5), timeout_s=2)).ID)
        await client.keepalive(lease, timeout_s=2)
        victim = members[0]
        killed = time.monotonic()
        victim.kill()
        while True:
            try:
                if await client.keepalive(lease, timeout_s=0.5) > 0:
                    break
            except Unavailable:
                await asyncio.sleep(0.1)
        took = time.monotonic() - killed
        victim.start()
        cluster.etcdctl("endpoint", "health", "--cluster")
        return took
    finally:
        await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument(
        "--election-timeout",
        type=int,
        help="etcd's --election-timeout in ms (heartbeat a tenth of it); etcd's default 1000",
    )
    args = parser.parse_args()
    cluster = EtcdCluster(3, election_timeout_ms=args.election_timeout)
    try:
        cluster.start()
        for role in ("follower", "leader"):
            runs = [await trial(cluster, role) for _ in range(args.trials)]
            print(
                json.dumps(
                    {
                        "bench": "etcd_failover",
                        "killed": role,
                        "election_timeout_ms": args.election_timeout or 1000,
                        "trials": len(runs),
                        "renewed_s_median": round(statistics.median(runs), 3),
                        "renewed_s_max": round(max(runs), 3),
                        "renewed_s": [round(r, 3) for r in runs],
                    }
                ),
                flush=True,
            )
    finally:
        cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
