"""Rebalance move counts against the brute-force minimum, and planning time at scale.

Pure (no etcd, no daemons): the planner of coordinator/placement/rebalance.py on seeded
random clusters.
- small: clusters of 2-4 hosts and 2-6 VMs under random required and preferred rules,
  placed at random (so rules are broken); for each, the planner's repair moves, the
  greedy fallback's (exact search off) and the brute force's minimum over every placement
  (the checker of tests/coordinator/placement/test_rebalance_plan.py).
- large: H hosts, 10 VMs per host, a tenth of the VMs in anti-affinity pairs, a third of
  the pairs on one host: planning time, moves, and whether they are proven fewest.
Prints JSON lines with --json. Run: python bench/rebalance.py --json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "coordinator" / "placement"))

from cluster_builders import affinity, anti, host, snapshot, vm  # noqa: E402
from hvplace.coordinator.placement.rebalance import plan_rebalance  # noqa: E402
from hvplace.coordinator.snapshot import Snapshot  # noqa: E402
from hvplace.proto.records import Enforcement, HostState, Rule  # noqa: E402
from test_rebalance_plan import _brute_minimum  # noqa: E402


def small_cluster(rng: random.Random) -> Snapshot:
    n_hosts = rng.randint(2, 4)
    hosts = [
        host(
            f"h{i}",
            cpu=rng.randint(2, 4),
            mem=8192,
            state=HostState.CORDONED if rng.random() < 0.15 else HostState.READY,
            rack=f"r{i % 2}",
        )
        for i in range(n_hosts)
    ]
    vms = [vm(f"v{i}", cpu=rng.randint(1, 2), mem=512) for i in range(rng.randint(2, 6))]
    placements = {v.key: f"h{rng.randrange(n_hosts)}" for v in vms}
    free = [v.name for v in vms]
    rules: list[Rule] = []
    for r in range(rng.randint(1, 3)):
        if len(free) < 2:
            break
        members = rng.sample(free, rng.randint(2, min(4, len(free))))
        for m in members:
            free.remove(m)
        enforcement = Enforcement.PREFERRED if rng.random() < 0.25 else Enforcement.REQUIRED
        weight = 50 if enforcement is Enforcement.PREFERRED else 0
        if rng.random() < 0.5:
            rules.append(
                anti(
                    f"r{r}",
                    *members,
                    topology_key=rng.choice(["host", "host", "rack"]),
                    max_per_domain=rng.randint(1, 2),
                    enforcement=enforcement,
                    weight=weight,
                )
            )
        else:
            rules.append(affinity(f"r{r}", *members, enforcement=enforcement, weight=weight))
    return snapshot(hosts, vms, placements, rules)


def run_small(count: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    broken = repairable = exact_equal = greedy_equal = greedy_extra = greedy_stuck = 0
    planner_moves = brute_moves = 0
    for _ in range(count):
        snap = small_cluster(rng)
        plan = plan_rebalance(snap, improve=False)
        if not plan.broken:
            continue
        broken += 1
        best = _brute_minimum(snap)
        if best is None:
            continue
        repairable += 1
        greedy = plan_rebalance(snap, improve=False, exact_budget=0)
        planner_moves += plan.repair_moves
        brute_moves += best
        exact_equal += plan.repair_moves == best and not plan.unrepaired
        if greedy.unrepaired:
            greedy_stuck += 1
        else:
            greedy_equal += greedy.repair_moves == best
            greedy_extra += greedy.repair_moves - best
    return {
        "bench": "rebalance_small",
        "clusters": count,
        "seed": seed,
        "broken": broken,
        "repairable": repairable,
        "planner_equal_to_brute_minimum": exact_equal,
        "planner_moves": planner_moves,
        "brute_minimum_moves": brute_moves,
        "greedy_only_equal_to_minimum": greedy_equal,
        "greedy_only_extra_moves": greedy_extra,
        "greedy_only_unrepaired": greedy_stuck,
    }


def large_cluster(rng: random.Random, hosts: int) -> Snapshot:
    hs = [host(f"h{i:03d}", cpu=64, mem=262144, rack=f"r{i % 8}") for i in range(hosts)]
    vms = [vm(f"v{i:05d}", cpu=1, mem=1024) for i in range(hosts * 10)]
    placements = {v.key: hs[rng.randrange(hosts)].name for v in vms}
    names = [v.name for v in vms]
    rng.shuffle(names)
    pairs = len(names) // 20
    rules = [anti(f"p{i}", names[2 * i], names[2 * i + 1]) for i in range(pairs)]
    for i in range(0, pairs, 3):  # a third of the pairs share a host (as after a failover)
        placements[f"t1/{names[2 * i + 1]}"] = placements[f"t1/{names[2 * i]}"]
    return snapshot(hs, vms, placements, rules)


def run_large(hosts: int, seed: int, repeat: int) -> dict[str, Any]:
    rng = random.Random(seed)
    snap = large_cluster(rng, hosts)
    times = []
    plan = None
    for _ in range(repeat):
        started = time.perf_counter()
        plan = plan_rebalance(snap, improve=False)
        times.append(time.perf_counter() - started)
    assert plan is not None
    return {
        "bench": "rebalance_large",
        "hosts": hosts,
        "vms": len(snap.vms),
        "rules": len(snap.rules),
        "broken_rules": len(plan.broken),
        "repair_moves": plan.repair_moves,
        "minimal": plan.minimal,
        "unrepaired": len(plan.unrepaired),
        "plan_s_min": round(min(times), 4),
        "plan_s_median": round(statistics.median(times), 4),
        "plan_s_max": round(max(times), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--clusters", type=int, default=400)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--hosts", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = [run_small(args.clusters, args.seed)]
    results.extend(run_large(h, args.seed, args.repeat) for h in args.hosts)
    for r in results:
        print(json.dumps(r, sort_keys=True) if args.json else r)


if __name__ == "__main__":
    main()
